//! The REST API's OpenAPI document (docs/openapi.json), generated from the API types: their
//! schemas come from the `utoipa::ToSchema` derives beside them, the operations from one stub per
//! route in this module's files, each with every status and content type the daemon answers it
//! with. A test keeps docs/openapi.json equal to [`to_json`], and an end-to-end test runs
//! schemathesis against a daemon with it.

mod bundle;
mod files;
mod images;
mod net;
mod ops;
mod params;
mod pools;
mod processes;
mod sandboxes;
pub(crate) mod schemas;
mod snapshots;
mod state;
mod volumes;

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, RefOr, ResponseBuilder};
use utoipa::{Modify, OpenApi};

use schemas::NetModes;

use crate::{ApiError, ExecClientMessage, ExecServerMessage, ExecStart};

/// The whole document.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The document as docs/openapi.json holds it: pretty JSON and a final newline.
pub fn to_json() -> String {
    let mut json = document().to_pretty_json().expect("the OpenAPI document serializes");
    json.push('\n');
    json
}

const DESCRIPTION: &str = "\
The moat daemon's REST API: JSON over HTTP/1.1 on the daemon's unix socket \
(`$MOAT_HOME/moat.sock`, no token), and on TCP with `Authorization: Bearer <token>` (the token is \
in `$MOAT_HOME/token`) when the daemon runs with `moat serve --tcp`.

Errors carry an HTTP status and an `ApiError` body: a stable code, a message and a hint. A JSON \
request body is an object of at most 64 KiB (larger ones are answered 413), and may be left out \
when every field is optional; a number without a fraction (`2.0`) is the integer it spells. \
Unknown fields and query parameters are refused (400).

Two endpoints are WebSockets (`exec` and `processes/{pid}/attach`: 101 Switching Protocols), \
`ports/{guest_port}/connect` turns the connection into a TCP stream to the guest (101, `Upgrade: \
tcp`), and several answer with a stream: `GET /v1/events` and `files/watch` send NDJSON lines, \
`logs?follow=true` and `events?follow=true` stay open until the client leaves, and the image \
operations stream their progress. `/mcp` serves the same sandboxes to MCP clients (streamable \
HTTP).";

#[derive(OpenApi)]
#[openapi(
    info(title = "moat daemon API", version = "1", description = DESCRIPTION),
    paths(
        sandboxes::openapi,
        sandboxes::health,
        sandboxes::list_sandboxes,
        sandboxes::create_sandbox,
        sandboxes::inspect_sandbox,
        sandboxes::remove_sandbox,
        sandboxes::stop_sandbox,
        sandboxes::start_sandbox,
        sandboxes::renew_lease,
        sandboxes::sandbox_lifecycle,
        snapshots::list_sandbox_snapshots,
        snapshots::create_snapshot,
        snapshots::revert_sandbox,
        snapshots::fork_sandbox,
        sandboxes::pause_sandbox,
        sandboxes::resume_sandbox,
        pools::list_pools,
        pools::set_pool,
        net::sandbox_net,
        net::change_allowlist,
        net::list_ports,
        net::add_port,
        net::remove_port,
        net::connect_port,
        snapshots::list_snapshots,
        snapshots::inspect_snapshot,
        snapshots::remove_snapshot,
        snapshots::pull_snapshot,
        snapshots::push_snapshot,
        snapshots::fork_snapshot,
        volumes::list_volumes,
        volumes::create_volume,
        volumes::inspect_volume,
        volumes::remove_volume,
        processes::exec,
        processes::sandbox_logs,
        processes::list_processes,
        processes::start_process,
        processes::attach_process,
        processes::kill_process,
        files::stat_file,
        files::list_files,
        files::make_dir,
        files::remove_path,
        files::rename_path,
        files::change_mode,
        files::watch_files,
        files::read_file,
        files::write_file,
        files::read_archive,
        files::write_archive,
        sandboxes::events,
        images::list_images,
        images::build_image,
        images::pull_image,
        images::image_gc,
        images::import_image,
        images::inspect_image,
        images::remove_image,
        sandboxes::prune,
        sandboxes::gc,
        state::backup_state,
        ops::disk_usage,
        ops::metrics,
        bundle::create_bundle,
        sandboxes::mcp_post,
        sandboxes::mcp_get,
        sandboxes::mcp_delete,
    ),
    // The exec WebSocket's messages: no operation names them as a body.
    components(schemas(ExecStart, ExecClientMessage, ExecServerMessage)),
    modifiers(&BearerToken, &NetModes, &OptionalBodies, &ErrorStatuses),
    security(("bearer" = [])),
    tags(
        (name = "sandboxes", description = "Sandboxes and their lifecycle"),
        (name = "snapshots", description = "Snapshots, templates, revert and fork"),
        (name = "volumes", description = "Named volumes: disks that outlive sandboxes"),
        (name = "network", description = "A sandbox's network: allowlist and port forwards"),
        (name = "processes", description = "Running commands in a sandbox, and its logs"),
        (name = "files", description = "Files in a running sandbox"),
        (name = "images", description = "The image store"),
        (name = "daemon", description = "The daemon itself: health, events, gc, MCP"),
    )
)]
struct ApiDoc;

/// The TCP listener's bearer token: a scheme, and a 401 answer on every operation (the check
/// wraps every route).
struct BearerToken;

impl Modify for BearerToken {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "Only on TCP (`moat serve --tcp`): the token in `$MOAT_HOME/token`. The unix socket \
                         needs none; its file mode decides who may connect.",
                    ))
                    .build(),
            ),
        );
        let unauthorized = ResponseBuilder::new()
            .description("Missing or wrong bearer token (TCP only)")
            .content("application/json", ContentBuilder::new().schema(Some(RefOr::Ref(ref_to::<ApiError>()))).build())
            .build();
        for item in doc.paths.paths.values_mut() {
            for op in [&mut item.get, &mut item.put, &mut item.post, &mut item.delete].into_iter().flatten() {
                op.responses.responses.insert("401".into(), RefOr::T(unauthorized.clone()));
            }
        }
    }
}

/// A JSON body the daemon takes as absent (an empty body stands for `{}`), written
/// `request_body(content = Option<T>)` in the stubs: utoipa makes that `T or null`, OpenAPI says
/// it with `required: false`. `null` itself is not a valid body.
struct OptionalBodies;

impl Modify for OptionalBodies {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::schema::{Schema, Type};
        use utoipa::openapi::Required;
        let is_null =
            |s: &RefOr<Schema>| matches!(s, RefOr::T(Schema::Object(o)) if o.schema_type == Type::Null.into());
        for item in doc.paths.paths.values_mut() {
            for op in [&mut item.put, &mut item.post].into_iter().flatten() {
                let Some(RefOr::T(body)) = op.request_body.as_mut() else { continue };
                for content in body.content.values_mut() {
                    let RefOr::T(content) = content else { continue };
                    let Some(RefOr::T(Schema::OneOf(one_of))) = &content.schema else { continue };
                    if one_of.items.len() == 2 && is_null(&one_of.items[1]) {
                        content.schema = Some(one_of.items[0].clone());
                        body.required = Some(Required::False);
                    }
                }
            }
        }
    }
}

/// Each error code's HTTP status, from [`crate::ErrorCode::http_status`], in the code's
/// description.
struct ErrorStatuses;

impl Modify for ErrorStatuses {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::schema::Schema;
        let Some(RefOr::T(Schema::Object(codes))) = doc
            .components
            .as_mut()
            .and_then(|c| c.schemas.get_mut(<crate::ErrorCode as utoipa::ToSchema>::name().as_ref()))
        else {
            return;
        };
        let statuses: Vec<String> = codes
            .enum_values
            .iter()
            .flatten()
            .filter_map(|v| {
                Some(format!(
                    "`{}` {}",
                    v.as_str()?,
                    serde_json::from_value::<crate::ErrorCode>(v.clone()).ok()?.http_status()
                ))
            })
            .collect();
        let about = codes.description.take().unwrap_or_default();
        codes.description = Some(format!("{about} The statuses: {}.", statuses.join(", ")));
    }
}

/// A `$ref` to the component schema of `T`.
fn ref_to<T: utoipa::ToSchema>() -> utoipa::openapi::Ref {
    utoipa::openapi::Ref::from_schema_name(T::name())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn doc() -> Value {
        serde_json::to_value(document()).expect("the document is JSON")
    }

    fn pattern(v: &Value) -> regex::Regex {
        regex::Regex::new(v["pattern"].as_str().expect("a pattern")).expect("the pattern compiles")
    }

    #[test]
    fn every_operation_answers_401_without_the_token() {
        let d = doc();
        for (path, item) in d["paths"].as_object().expect("paths") {
            for (method, op) in item.as_object().expect("an item") {
                assert!(op["responses"]["401"].is_object(), "{method} {path}");
            }
        }
        assert_eq!(d["security"][0]["bearer"], serde_json::json!([]));
    }

    #[test]
    fn bodies_with_only_optional_fields_may_be_left_out() {
        let d = doc();
        let body = &d["paths"]["/v1/sandboxes"]["post"]["requestBody"];
        assert_eq!(body["required"], false);
        assert_eq!(body["content"]["application/json"]["schema"]["$ref"], "#/components/schemas/CreateSandbox");
        assert_eq!(d["paths"]["/v1/sandboxes/{reference}/lease"]["post"]["requestBody"]["required"], true);
    }

    #[test]
    fn names_follow_validate_name() {
        let d = doc();
        let name = &d["components"]["schemas"]["CreateSandbox"]["properties"]["name"];
        // The lookahead refuses hex digits alone; `regex` has none, so the two halves are checked
        // apart.
        let (hex, rest) = (r"^[0-9A-Fa-f]+$", r"^[A-Za-z0-9][A-Za-z0-9._-]*$");
        assert_eq!(name["pattern"], format!("^(?!{}){}", &hex[1..], &rest[1..]));
        let (hex, rest) = (regex::Regex::new(hex).unwrap(), regex::Regex::new(rest).unwrap());
        let max = name["maxLength"].as_u64().unwrap() as usize;
        for n in ["box", "web-1.test_a", "", "-x", ".x", "a b", "ab/c", "deadbeef", "DEADBEEF", "g", &"x".repeat(63)]
            .into_iter()
            .map(String::from)
            .chain([&"x".repeat(64)].into_iter().cloned())
        {
            let schema_valid = rest.is_match(&n) && !hex.is_match(&n) && n.len() <= max;
            assert_eq!(schema_valid, crate::validate_name(&n).is_ok(), "{n:?}");
        }
    }

    #[test]
    fn network_lists_take_what_the_daemon_documents() {
        let d = doc();
        let net = &d["components"]["schemas"]["NetSpec"]["allOf"][0]["properties"];
        let allow = pattern(&net["allow"]["items"]);
        for ok in ["pypi.org", "*.pythonhosted.org", "a_b.example", "localhost"] {
            assert!(allow.is_match(ok), "{ok}");
        }
        for bad in ["*.org", "1.2.3.4", "-x.org", "pypi.org.", "a..b", "*", "", "x y"] {
            assert!(!allow.is_match(bad), "{bad}");
        }
        let cidrs = pattern(&net["allow_cidrs"]["items"]);
        assert!(cidrs.is_match("10.1.0.0/16") && cidrs.is_match("127.0.0.1"));
        assert!(!cidrs.is_match("10.1.0.0/33") && !cidrs.is_match("010.1.0.0") && !cidrs.is_match("::1/128"));
        let hosts = pattern(&net["hosts"]["items"]);
        assert!(hosts.is_match("db.internal:10.0.0.5"));
        assert!(!hosts.is_match("10.0.0.1:10.0.0.5") && !hosts.is_match("db:300.0.0.1") && !hosts.is_match("db"));
        let dns = pattern(&net["dns"]["items"]["anyOf"][0]);
        assert!(dns.is_match("1.1.1.1") && dns.is_match("1.1.1.1:53") && dns.is_match("1.1.1.1:65535"));
        assert!(!dns.is_match("1.1.1.1:65536") && !dns.is_match("1.1.1.1:053") && !dns.is_match("one.one"));
    }

    #[test]
    fn streams_say_they_stream() {
        let d = doc();
        let events = &d["paths"]["/v1/events"]["get"];
        assert!(events["responses"]["200"]["content"]["application/x-ndjson"].is_object());
        assert!(events["description"].as_str().unwrap().contains("never ends"));
        for ws in [
            "/v1/sandboxes/{reference}/exec",
            "/v1/sandboxes/{reference}/processes/{pid}/attach",
            "/v1/sandboxes/{reference}/ports/{guest_port}/connect",
        ] {
            assert!(d["paths"][ws]["get"]["responses"]["101"].is_object(), "{ws}");
        }
    }
}
