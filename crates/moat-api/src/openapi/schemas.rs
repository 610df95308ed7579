//! Schemas the derives cannot express: raw bodies, lists whose items follow a grammar (host
//! patterns, networks, `NAME:IP` entries, resolvers, commands, environments), and the network
//! modes' rules across fields. The patterns admit what the daemon accepts in the form clients
//! write it (e.g. no trailing dot on a hostname, no leading zeros in an address); the daemon's
//! checks are in `moat-daemon/src/net.rs` and the agent's in `moat-agent`.

use utoipa::openapi::schema::{
    AdditionalProperties, AllOfBuilder, AnyOfBuilder, ArrayBuilder, KnownFormat, ObjectBuilder, OneOfBuilder,
    SchemaFormat, SchemaType, Type,
};
use utoipa::openapi::{RefOr, Schema};
use utoipa::Modify;

/// Raw bytes: a file's contents or a tar archive.
pub struct Binary;

impl utoipa::PartialSchema for Binary {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Binary)))
            .into()
    }
}

impl utoipa::ToSchema for Binary {}

/// A DNS label; the last one of a name starts with a letter or `_`, so no name reads as an
/// IPv4 address.
const LABEL: &str = "[A-Za-z0-9_][A-Za-z0-9_-]{0,62}";
const LAST_LABEL: &str = "[A-Za-z_][A-Za-z0-9_-]{0,62}";
const OCTET: &str = "(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])";
const PORT: &str = "(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3}|0)";
/// Entries of every network list the daemon takes.
const MAX_ENTRIES: usize = 256;

fn hostname() -> String {
    format!("({LABEL}\\.)*{LAST_LABEL}")
}

fn ipv4() -> String {
    format!("{OCTET}(\\.{OCTET}){{3}}")
}

fn string(pattern: impl Into<String>) -> ObjectBuilder {
    ObjectBuilder::new().schema_type(Type::String).pattern(Some(pattern))
}

fn list(items: impl Into<utoipa::openapi::schema::ArrayItems>, max_items: usize) -> ArrayBuilder {
    ArrayBuilder::new().items(items).max_items(Some(max_items))
}

/// Sandbox references (names, ids or id prefixes), at most [`crate::MAX_BUNDLE_SANDBOXES`].
pub fn references() -> ArrayBuilder {
    let reference = ObjectBuilder::new().schema_type(Type::String).min_length(Some(1)).max_length(Some(128));
    list(reference, crate::MAX_BUNDLE_SANDBOXES)
}

/// A hostname pattern: `pypi.org`, or `*.pythonhosted.org` for the names below one.
fn host_pattern() -> ObjectBuilder {
    let (name, label) = (hostname(), LABEL);
    string(format!("^(\\*\\.({label}\\.)+{LAST_LABEL}|{name})$")).max_length(Some(253))
}

/// `NetSpec.allow`, `SecretSpec.hosts`, `ChangeAllowlist.add`.
pub fn host_patterns() -> ArrayBuilder {
    list(host_pattern(), MAX_ENTRIES)
        .description(Some("Hostnames (`pypi.org`) and wildcards below one (`*.pythonhosted.org`)"))
}

/// `NetSpec.allow_cidrs`.
pub fn cidrs() -> ArrayBuilder {
    list(string(format!("^{}(/([0-9]|[12][0-9]|3[0-2]))?$", ipv4())), MAX_ENTRIES).description(Some(
        "IPv4 networks or addresses reachable in any mode, even private ones: `10.1.0.0/16`, `127.0.0.1` (the \
         guest reaches the host's loopback at 10.0.2.2)",
    ))
}

/// `NetSpec.hosts`.
pub fn host_entries() -> ArrayBuilder {
    list(string(format!("^{}:{}$", hostname(), ipv4())).max_length(Some(253 + 16)), MAX_ENTRIES)
        .description(Some("`NAME:IPV4` entries moat's DNS answers itself: `db.internal:10.0.0.5`"))
}

/// `NetSpec.dns`.
pub fn resolvers() -> ArrayBuilder {
    let v4 = string(format!("^{}(:{PORT})?$", ipv4()));
    let v6 = ObjectBuilder::new().schema_type(Type::String).format(Some(SchemaFormat::KnownFormat(KnownFormat::Ipv6)));
    list(AnyOfBuilder::new().item(v4).item(v6), 4)
        .description(Some("Upstream resolvers, `IP` or `IPV4:PORT`, at most 4 [default: the host's]"))
}

/// `PortForward.host_addr`: an IPv4 or IPv6 address.
pub fn ip_address() -> AnyOfBuilder {
    let v4 = ObjectBuilder::new().schema_type(Type::String).format(Some(SchemaFormat::KnownFormat(KnownFormat::Ipv4)));
    let v6 = ObjectBuilder::new().schema_type(Type::String).format(Some(SchemaFormat::KnownFormat(KnownFormat::Ipv6)));
    AnyOfBuilder::new()
        .item(v4)
        .item(v6)
        .description(Some("The host address to listen on [default: 127.0.0.1]"))
        .default(Some("127.0.0.1".into()))
}

/// `SecretSpec.name`: an environment variable's name.
pub fn secret_name() -> ObjectBuilder {
    string("^[A-Za-z_][A-Za-z0-9_]*$").max_length(Some(128)).description(Some(
        "The environment variable that holds the placeholder `moat_placeholder_NAME` in every process of the \
         sandbox; unique among the sandbox's secrets",
    ))
}

/// `SecretSpec.value`: sent on create, never answered.
pub fn secret_value() -> ObjectBuilder {
    string("^[^\\r\\n\\u0000]+$").max_length(Some(16 * 1024)).write_only(true).description(Some(
        "The real value (create only; never answered): 1 byte to 16 KiB without line breaks or NUL bytes. \
         Put into the header values and query of HTTPS requests to the hosts, on the host, by TLS \
         interception with a per-sandbox CA the guest trusts",
    ))
}

/// A command line: no NUL bytes, and the program's name is not empty.
fn argv(min_items: Option<usize>) -> ArrayBuilder {
    let arg = || string("^[^\\u0000]*$");
    ArrayBuilder::new().prefix_items([arg().min_length(Some(1))]).items(arg()).min_items(min_items)
}

/// `StartProcess.argv`.
pub fn command() -> ArrayBuilder {
    argv(Some(1)).description(Some("The program and its arguments"))
}

/// `ExecStart.argv`.
pub fn command_or_image_default() -> ArrayBuilder {
    argv(None).description(Some("The program and its arguments; empty: the image's Entrypoint and Cmd"))
}

/// `StartProcess.env`, `ExecStart.env`: `[NAME, VALUE]` pairs.
pub fn environment() -> ArrayBuilder {
    let (name, value) = (string("^[^=\\u0000]+$"), string("^[^\\u0000]*$"));
    let pair = ArrayBuilder::new()
        .prefix_items([Schema::from(name), Schema::from(value)])
        .items(utoipa::openapi::schema::ArrayItems::False)
        .min_items(Some(2));
    ArrayBuilder::new()
        .items(pair)
        .description(Some("Environment variables as `[NAME, VALUE]` pairs, over the image's and the defaults"))
}

/// `ImageInfo.env`: `[NAME, VALUE]` pairs. (Answers spell a pair without `prefixItems`, which
/// schemathesis 4 cannot read in a response.)
pub fn env_pairs() -> ArrayBuilder {
    let pair =
        ArrayBuilder::new().items(ObjectBuilder::new().schema_type(Type::String)).min_items(Some(2)).max_items(Some(2));
    ArrayBuilder::new().items(pair).description(Some("The image's environment as `[NAME, VALUE]` pairs"))
}

/// The network modes' rules across `NetSpec`'s fields: mode `none` takes no lists (it has no
/// network device), and only mode `allow` takes an allowlist.
pub struct NetModes;

impl Modify for NetModes {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let Some(schemas) = doc.components.as_mut().map(|c| &mut c.schemas) else { return };
        let Some(fields) = schemas.remove("NetSpec") else { return };
        let mode = |m: &str| ObjectBuilder::new().schema_type(Type::String).enum_values(Some([m]));
        let empty = || ArrayBuilder::new().max_items(Some(0));
        let mut none = ObjectBuilder::new().required("mode").property("mode", mode("none"));
        for list in ["allow", "allow_cidrs", "hosts", "dns", "secrets", "ports"] {
            none = none.property(list, empty());
        }
        let default = ObjectBuilder::new().property("mode", mode("default")).property("allow", empty());
        let allow = ObjectBuilder::new().required("mode").property("mode", mode("allow"));
        let modes = OneOfBuilder::new().item(none).item(default).item(allow);
        schemas.insert("NetSpec".into(), AllOfBuilder::new().item(fields).item(modes).into());
    }
}

/// `SecretSpec.hosts`: at least one.
pub fn secret_hosts() -> ArrayBuilder {
    host_patterns().min_items(Some(1))
}

/// A JSON-RPC 2.0 message, as MCP clients send them: a request, a notification, or a response
/// to a request of the server's.
pub struct JsonRpcMessage;

impl utoipa::PartialSchema for JsonRpcMessage {
    fn schema() -> RefOr<Schema> {
        let version = || ObjectBuilder::new().schema_type(Type::String).enum_values(Some(["2.0"]));
        let integer =
            |f: KnownFormat| ObjectBuilder::new().schema_type(Type::Integer).format(Some(SchemaFormat::KnownFormat(f)));
        let id = || {
            OneOfBuilder::new().item(ObjectBuilder::new().schema_type(Type::String)).item(integer(KnownFormat::Int64))
        };
        let method = || ObjectBuilder::new().schema_type(Type::String).min_length(Some(1));
        let object = || ObjectBuilder::new().schema_type(Type::Object);
        let message = |required: &[&str]| {
            let mut o = ObjectBuilder::new()
                .property("jsonrpc", version())
                .additional_properties(Some(AdditionalProperties::FreeForm(false)));
            for r in ["jsonrpc"].iter().chain(required) {
                o = o.required(*r);
            }
            o
        };
        let request =
            message(&["id", "method"]).property("id", id()).property("method", method()).property("params", object());
        let notification = message(&["method"])
            .property("method", method())
            .property("params", object())
            .description(Some("A notification: no id, no answer"));
        let error = ObjectBuilder::new()
            .property("code", integer(KnownFormat::Int32))
            .property("message", ObjectBuilder::new().schema_type(Type::String))
            .property("data", ObjectBuilder::new().schema_type(SchemaType::AnyValue))
            .required("code")
            .required("message")
            .additional_properties(Some(AdditionalProperties::FreeForm(false)));
        let result = message(&["id", "result"]).property("id", id()).property("result", object());
        let failure = message(&["id", "error"]).property("id", id()).property("error", error);
        OneOfBuilder::new().item(request).item(notification).item(result).item(failure).into()
    }
}

impl utoipa::ToSchema for JsonRpcMessage {}
