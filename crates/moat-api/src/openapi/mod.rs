//! The REST API's OpenAPI document (docs/openapi.json), generated from the API types: their
//! schemas come from the `utoipa::ToSchema` derives beside them, the operations from one stub per
//! route in this module's files, each with every status and content type the daemon answers it
//! with. A test keeps docs/openapi.json equal to [`to_json`], and an end-to-end test runs
//! schemathesis against a daemon with it.

mod files;
mod images;
mod net;
mod params;
mod processes;
mod sandboxes;
pub(crate) mod schemas;
mod snapshots;

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

Errors carry an HTTP status and an `ApiError` body: a stable code, a message and a hint. Request \
bodies of JSON endpoints are at most 64 KiB (larger ones are answered 413) and may be empty when \
every field is optional. Unknown fields and query parameters are refused (400).

Two endpoints are WebSockets (`exec` and `processes/{pid}/attach`: 101 Switching Protocols), and \
several answer with a stream: `GET /v1/events` and `files/watch` send NDJSON lines, \
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
        net::sandbox_net,
        net::change_allowlist,
        net::list_ports,
        net::add_port,
        net::remove_port,
        snapshots::list_snapshots,
        snapshots::inspect_snapshot,
        snapshots::remove_snapshot,
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
        sandboxes::mcp_post,
        sandboxes::mcp_get,
        sandboxes::mcp_delete,
    ),
    // The exec WebSocket's messages: no operation names them as a body.
    components(schemas(ExecStart, ExecClientMessage, ExecServerMessage)),
    modifiers(&BearerToken, &NetModes, &OptionalBodies),
    security(("bearer" = [])),
    tags(
        (name = "sandboxes", description = "Sandboxes and their lifecycle"),
        (name = "snapshots", description = "Snapshots, templates, revert and fork"),
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

/// A `$ref` to the component schema of `T`.
fn ref_to<T: utoipa::ToSchema>() -> utoipa::openapi::Ref {
    utoipa::openapi::Ref::from_schema_name(T::name())
}
