#!/usr/bin/env python3
"""Write docs/openapi.json, the REST API's document.

The daemon's unit tests check it against the code: every route the router serves is in it (and
nothing else), and the request schemas list exactly the fields of the request types.
Run: scripts/gen-openapi.py > docs/openapi.json
"""
import json
ref=lambda n: {"$ref": f"#/components/schemas/{n}"}
def jresp(desc, schema): return {"description": desc, "content": {"application/json": {"schema": schema}}}
err={"default": jresp("An error: a stable code, a message and a hint", ref("ApiError"))}
P={"name":"reference","in":"path","required":True,"description":"Sandbox name, id or unique id prefix","schema":{"type":"string"}}
pathq={"name":"path","in":"query","required":True,"description":"Absolute guest path","schema":{"type":"string","maxLength":4096}}
recq={"name":"recursive","in":"query","schema":{"type":"boolean","default":False}}
pidp={"name":"pid","in":"path","required":True,"schema":{"type":"integer"}}
SP={"name":"reference","in":"path","required":True,"description":"Snapshot as SANDBOX:NAME (also the name of a removed sandbox), id or unique id prefix","schema":{"type":"string"}}
paths={
 "/openapi.json":{"get":{"summary":"This document","operationId":"openapi","responses":{"200":{"description":"OpenAPI 3.1 document"}}}},
 "/v1/health":{"get":{"summary":"Daemon version, accelerator, QEMU and kernel","operationId":"health","responses":{"200":jresp("Health",ref("Health")),**err}}},
 "/v1/sandboxes":{
   "get":{"summary":"List sandboxes","operationId":"listSandboxes","responses":{"200":jresp("All sandboxes, oldest first",{"type":"array","items":ref("SandboxInfo")}),**err}},
   "post":{"summary":"Create a sandbox: boot it, restore its image's template, or restore a snapshot (`from`); answers once it runs","operationId":"createSandbox","requestBody":{"required":False,"content":{"application/json":{"schema":ref("CreateSandbox")}}},"responses":{"201":jresp("The running sandbox",ref("SandboxInfo")),**err}}},
 "/v1/sandboxes/{reference}":{
   "parameters":[P],
   "get":{"summary":"Inspect a sandbox","operationId":"inspectSandbox","responses":{"200":jresp("The sandbox",ref("SandboxInfo")),**err}},
   "delete":{"summary":"Remove a sandbox (a running one only with force)","operationId":"removeSandbox","parameters":[{"name":"force","in":"query","schema":{"type":"boolean","default":False}}],"responses":{"200":jresp("The removed sandbox as it was",ref("SandboxInfo")),**err}}},
 "/v1/sandboxes/{reference}/stop":{"parameters":[P],"post":{"summary":"Stop a running sandbox, keeping its disk (a paused one is refused: resume or remove it)","operationId":"stopSandbox","responses":{"200":jresp("The stopped sandbox",ref("SandboxInfo")),**err}}},
 "/v1/sandboxes/{reference}/start":{"parameters":[P],"post":{"summary":"Boot a stopped, expired or failed sandbox from its disk, or continue a paused one","operationId":"startSandbox","responses":{"200":jresp("The running sandbox",ref("SandboxInfo")),**err}}},
 "/v1/sandboxes/{reference}/lease":{"parameters":[P],"post":{"summary":"Renew a running sandbox's lease","operationId":"renewLease","requestBody":{"required":True,"content":{"application/json":{"schema":ref("RenewLease")}}},"responses":{"200":jresp("The sandbox with its new expiry",ref("SandboxInfo")),**err}}},
 "/v1/sandboxes/{reference}/lifecycle":{"parameters":[P],"get":{"summary":"Every phase the sandbox went through","operationId":"sandboxLifecycle","responses":{"200":jresp("Lifecycle, oldest first",{"type":"array","items":ref("LifecycleEntry")}),**err}}},
 "/v1/sandboxes/{reference}/snapshots":{"parameters":[P],
   "get":{"summary":"The sandbox's snapshots","operationId":"listSandboxSnapshots","responses":{"200":jresp("Its snapshots, oldest first",{"type":"array","items":ref("SnapshotInfo")}),**err}},
   "post":{"summary":"Snapshot a running sandbox: memory, device state and disk; it runs on after a short pause","operationId":"createSnapshot","requestBody":{"required":False,"content":{"application/json":{"schema":ref("CreateSnapshot")}}},"responses":{"201":jresp("The snapshot",ref("SnapshotInfo")),**err}}},
 "/v1/sandboxes/{reference}/revert":{"parameters":[P],"post":{"summary":"Throw away the sandbox's VM and disk and continue from one of its own snapshots","operationId":"revertSandbox","requestBody":{"required":True,"content":{"application/json":{"schema":ref("Revert")}}},"responses":{"200":jresp("The running sandbox, as it was at the snapshot",ref("SandboxInfo")),**err}}},
 "/v1/sandboxes/{reference}/fork":{"parameters":[P],"post":{"summary":"New sandboxes restored from a snapshot of this one (a new snapshot of its current state unless one is named); all or nothing","operationId":"forkSandbox","requestBody":{"required":False,"content":{"application/json":{"schema":ref("Fork")}}},"responses":{"201":jresp("The snapshot they build on and the new running sandboxes",ref("Forked")),**err}}},
 "/v1/sandboxes/{reference}/pause":{"parameters":[P],"post":{"summary":"Save a running sandbox's whole VM into its run directory and end QEMU (phase paused)","operationId":"pauseSandbox","responses":{"200":jresp("The paused sandbox",ref("SandboxInfo")),**err}}},
 "/v1/sandboxes/{reference}/resume":{"parameters":[P],"post":{"summary":"Continue a paused sandbox where it was","operationId":"resumeSandbox","responses":{"200":jresp("The running sandbox",ref("SandboxInfo")),**err}}},
 "/v1/snapshots":{"get":{"summary":"Every snapshot and image template","operationId":"listSnapshots","responses":{"200":jresp("All ready snapshots, oldest first",{"type":"array","items":ref("SnapshotInfo")}),**err}}},
 "/v1/snapshots/{reference}":{"parameters":[SP],
   "get":{"summary":"Inspect a snapshot or template","operationId":"inspectSnapshot","responses":{"200":jresp("The snapshot",ref("SnapshotInfo")),**err}},
   "delete":{"summary":"Remove a snapshot or template nothing builds on (in_use names the sandboxes that do)","operationId":"removeSnapshot","responses":{"200":jresp("The removed snapshot",ref("SnapshotInfo")),**err}}},
 "/v1/sandboxes/{reference}/exec":{"parameters":[P],"get":{"summary":"Run a process (WebSocket)","description":"Upgrade to a WebSocket. The client's first message is a text ExecStart; then binary messages are stdin bytes and text messages are ExecClientMessage. The daemon sends text ExecServerMessage (started, exit, error) and binary output whose first byte is the stream (1 stdout, 2 stderr). Output is sent only as fast as the client reads it; that is the flow control back to the guest.","operationId":"exec","responses":{"101":{"description":"Switching to the WebSocket protocol"},**err}}},
 "/v1/sandboxes/{reference}/logs":{"parameters":[P],"get":{"summary":"The guest console or QEMU's log (chunked text)","operationId":"sandboxLogs","parameters":[{"name":"source","in":"query","schema":{"type":"string","enum":["console","qemu"],"default":"console"}},{"name":"follow","in":"query","schema":{"type":"boolean","default":False}}],"responses":{"200":{"description":"The log; with follow, the stream stays open while the sandbox is live","content":{"text/plain":{"schema":{"type":"string"}}}},**err}}},
 "/v1/sandboxes/{reference}/files/stat":{"parameters":[P,pathq],"get":{"summary":"A file's metadata (lstat)","operationId":"statFile","responses":{"200":jresp("The file",ref("FileInfo")),**err}}},
 "/v1/sandboxes/{reference}/files/list":{"parameters":[P,pathq,recq],"get":{"summary":"A directory's entries (recursive: the whole tree; symlinks not followed)","operationId":"listFiles","responses":{"200":jresp("The entries",ref("Listing")),**err}}},
 "/v1/sandboxes/{reference}/files/content":{"parameters":[P,pathq],
   "get":{"summary":"A regular file's bytes, streamed","operationId":"readFile","responses":{"200":{"description":"The file","content":{"application/octet-stream":{"schema":{"type":"string","format":"binary"}}}},**err}},
   "put":{"summary":"Write the body to a file (atomic by default: written beside it, renamed into place)","operationId":"writeFile","parameters":[{"name":"mode","in":"query","description":"Octal permission bits, e.g. 644","schema":{"type":"string"}},{"name":"atomic","in":"query","schema":{"type":"boolean","default":True}}],
     "requestBody":{"required":True,"content":{"application/octet-stream":{"schema":{"type":"string","format":"binary"}}}},"responses":{"200":jresp("The written file",ref("FileInfo")),**err}}},
 "/v1/sandboxes/{reference}/files/mkdir":{"parameters":[P],"post":{"summary":"Make a directory","operationId":"makeDir","requestBody":{"required":True,"content":{"application/json":{"schema":ref("MakeDir")}}},"responses":{"200":jresp("Done",{"type":"object"}),**err}}},
 "/v1/sandboxes/{reference}/files/remove":{"parameters":[P],"post":{"summary":"Remove a file, symlink or directory","operationId":"removePath","requestBody":{"required":True,"content":{"application/json":{"schema":ref("RemovePath")}}},"responses":{"200":jresp("Done",{"type":"object"}),**err}}},
 "/v1/sandboxes/{reference}/files/rename":{"parameters":[P],"post":{"summary":"Rename (move) a path","operationId":"renamePath","requestBody":{"required":True,"content":{"application/json":{"schema":ref("RenamePath")}}},"responses":{"200":jresp("Done",{"type":"object"}),**err}}},
 "/v1/sandboxes/{reference}/files/chmod":{"parameters":[P],"post":{"summary":"Change permission bits","operationId":"changeMode","requestBody":{"required":True,"content":{"application/json":{"schema":ref("ChangeMode")}}},"responses":{"200":jresp("Done",{"type":"object"}),**err}}},
 "/v1/sandboxes/{reference}/files/watch":{"parameters":[P,pathq,recq],"get":{"summary":"Changes under a directory as NDJSON lines, until the client disconnects","operationId":"watchFiles","responses":{"200":{"description":"FsEvent lines","content":{"application/x-ndjson":{"schema":ref("FsEvent")}}},**err}}},
 "/v1/sandboxes/{reference}/archive":{"parameters":[P,pathq],
   "get":{"summary":"A tar archive of a file or tree (symlinks stored, not followed)","operationId":"readArchive","parameters":[{"name":"name","in":"query","description":"Name of the top-level entry [default: the path's last component]","schema":{"type":"string"}}],"responses":{"200":{"description":"The archive","content":{"application/x-tar":{"schema":{"type":"string","format":"binary"}}}},**err}},
   "put":{"summary":"Unpack a tar archive into an existing directory","operationId":"writeArchive","requestBody":{"required":True,"content":{"application/x-tar":{"schema":{"type":"string","format":"binary"}}}},"responses":{"200":jresp("Done",{"type":"object"}),**err}}},
 "/v1/sandboxes/{reference}/processes":{"parameters":[P],
   "get":{"summary":"Background processes, running and ended","operationId":"listProcesses","responses":{"200":jresp("The processes",{"type":"array","items":ref("JobInfo")}),**err}},
   "post":{"summary":"Start a background process","operationId":"startProcess","requestBody":{"required":True,"content":{"application/json":{"schema":ref("StartProcess")}}},"responses":{"200":jresp("Its pid",ref("ProcessStarted")),**err}}},
 "/v1/sandboxes/{reference}/processes/{pid}/attach":{"parameters":[P,pidp,{"name":"replay","in":"query","schema":{"type":"boolean","default":True}}],"get":{"summary":"WebSocket: a background process's output (kept, then live) and its exit, as exec output messages; closing it leaves the process running","operationId":"attachProcess","responses":{"101":{"description":"Switching to the WebSocket"},**err}}},
 "/v1/sandboxes/{reference}/processes/{pid}/kill":{"parameters":[P,pidp],"post":{"summary":"Signal a background process's group","operationId":"killProcess","requestBody":{"required":True,"content":{"application/json":{"schema":ref("KillProcess")}}},"responses":{"200":jresp("Done",{"type":"object"}),**err}}},
 "/v1/events":{"get":{"summary":"Events as NDJSON","operationId":"events","parameters":[{"name":"since","in":"query","schema":{"type":"integer","default":0}},{"name":"follow","in":"query","schema":{"type":"boolean","default":False}}],"responses":{"200":{"description":"One Event per line","content":{"application/x-ndjson":{"schema":ref("Event")}}},**err}}},
 "/v1/images":{"get":{"summary":"List images","operationId":"listImages","responses":{"200":jresp("All named images",{"type":"array","items":ref("ImageInfo")}),**err}}},
 "/v1/images/build":{"post":{"summary":"Build an image from Debian packages (debootstrap); streams progress","operationId":"buildImage","requestBody":{"required":True,"content":{"application/json":{"schema":ref("BuildImage")}}},"responses":{"200":{"description":"NDJSON ImageProgress lines, the last one done or error","content":{"application/x-ndjson":{"schema":ref("ImageProgress")}}},**err}}},
 "/v1/images/pull":{"post":{"summary":"Pull an image from a registry speaking the OCI distribution API; streams progress (per-layer bytes)","operationId":"pullImage","requestBody":{"required":True,"content":{"application/json":{"schema":ref("PullImage")}}},"responses":{"200":{"description":"NDJSON ImageProgress lines, the last one done or error","content":{"application/x-ndjson":{"schema":ref("ImageProgress")}}},**err}}},
 "/v1/images/gc":{"post":{"summary":"Remove cached layers, interrupted pulls and builds, and image files no image name or sandbox needs","operationId":"imageGc","responses":{"200":jresp("The paths removed",ref("Reclaimed")),**err}}},
 "/v1/images/import":{"post":{"summary":"Import a docker-save tarball or OCI image-layout archive (the request body); streams progress","operationId":"importImage","parameters":[{"name":"name","in":"query","description":"Name for the image [default: the archive's first tag]","schema":{"type":"string"}}],"requestBody":{"required":True,"content":{"application/x-tar":{"schema":{"type":"string","format":"binary"}}}},"responses":{"200":{"description":"NDJSON ImageProgress lines, the last one done or error","content":{"application/x-ndjson":{"schema":ref("ImageProgress")}}},**err}}},
 "/v1/images/{name}":{"parameters":[{"name":"name","in":"path","required":True,"description":"Image name, may contain '/'","schema":{"type":"string"}}],
   "get":{"summary":"Inspect an image","operationId":"inspectImage","responses":{"200":jresp("The image",ref("ImageInfo")),**err}},
   "delete":{"summary":"Remove an image name (and its disk when nothing else uses it)","operationId":"removeImage","responses":{"200":jresp("The removed image",ref("ImageInfo")),**err}}},
 "/v1/prune":{"post":{"summary":"Remove every stopped, failed, expired or paused sandbox","operationId":"prune","responses":{"200":jresp("What was removed",ref("Reclaimed")),**err}}},
 "/v1/gc":{"post":{"summary":"Reclaim leaked QEMU processes, sockets and directories, unfinished snapshots, and templates this host can no longer restore","operationId":"gc","responses":{"200":jresp("What was reclaimed",ref("Reclaimed")),**err}}},
 "/mcp":{
   "post":{"summary":"MCP (Model Context Protocol) streamable HTTP: JSON-RPC requests of an MCP client; `initialize` opens a session (`Mcp-Session-Id`). See docs/mcp.md","operationId":"mcpPost","responses":{"200":{"description":"A JSON-RPC response, or an event stream of messages ending with it"},"202":{"description":"A notification or response was accepted"}}},
   "get":{"summary":"MCP: the session's stream of server messages","operationId":"mcpStream","responses":{"200":{"description":"An event stream"}}},
   "delete":{"summary":"MCP: end the session (its sandboxes are removed)","operationId":"mcpEnd","responses":{"202":{"description":"The session ended"}}}},
}
phase={"type":"string","enum":["creating","booting","running","stopping","stopped","failed","expired","paused"],"description":"paused: the whole VM is saved in the run directory and no QEMU runs; resume (or start) continues it"}
on_exp={"type":"string","enum":["stop","remove"]}
opt=lambda t: {"type":[t,"null"]}
schemas={
 "Phase":phase,"OnExpire":on_exp,
 "CreateSandbox":{"type":"object","additionalProperties":False,"properties":{
   "name":{"type":"string","description":"1-63 of letters, digits, '-', '_', '.'; not all hex digits"},
   "image":{"type":"string","default":"default","description":"An image name; `default` (Debian with Python) is built by the first client that needs it, `minimal` (busybox) is built in"},"vcpus":{"type":"integer","minimum":1,"maximum":64,"default":1},
   "memory_mib":{"type":"integer","minimum":64,"maximum":262144,"default":512},"disk_mib":{"type":"integer","minimum":64,"default":4096},
   "ttl_secs":{"type":"integer","minimum":1,"description":"Lease; without it the sandbox lives until removed"},
   "on_expire":ref("OnExpire"),"hostname":{"type":"string"},"boot_timeout_secs":{"type":"integer","minimum":1,"maximum":3600,"default":90},
   "from":{"type":"string","description":"Continue from this snapshot (SANDBOX:NAME or a snapshot id) instead of booting; image, vcpus, memory_mib and disk_mib are the snapshot's, and other values are refused"},
   "template":{"type":"boolean","description":"Restore the template of this image and size when there is one, and save one when there is none [default: true, unless the daemon runs with --no-templates]; false boots"}}},
 "SandboxInfo":{"type":"object","required":["id","name","phase","image","image_digest","accel","vcpus","memory_mib","disk_mib","hostname","created_at","on_expire","version"],"properties":{
   "id":{"type":"string"},"name":{"type":"string"},"phase":ref("Phase"),"image":{"type":"string"},"image_digest":{"type":"string"},
   "accel":{"type":"string","enum":["kvm","tcg"]},"vcpus":{"type":"integer"},"memory_mib":{"type":"integer"},"disk_mib":{"type":"integer"},
   "hostname":{"type":"string"},"created_at":{"type":"integer","description":"Unix seconds"},"expires_at":{"type":["integer","null"],"description":"Unix seconds"},
   "on_expire":ref("OnExpire"),"pid":{"type":["integer","null"],"description":"QEMU's pid while the VM runs"},"last_error":opt("string"),"version":{"type":"integer"},
   "snapshot_id":{"type":["string","null"],"description":"The snapshot or template this sandbox was restored from; its disk builds on it"}}},
 "CreateSnapshot":{"type":"object","additionalProperties":False,"properties":{"name":{"type":"string","description":"Unique among the sandbox's snapshots; same rules as sandbox names [default: snap-N]"}}},
 "SnapshotKind":{"type":"string","enum":["snapshot","template"],"description":"template: the booted-and-ready VM kept per image and size, restored by create"},
 "SnapshotInfo":{"type":"object","required":["id","name","kind","sandbox_name","image","image_digest","vcpus","memory_mib","disk_mib","size_bytes","created_at","qemu","accel","kernel","initramfs","dependents"],"properties":{
   "id":{"type":"string"},"name":{"type":"string"},"kind":ref("SnapshotKind"),
   "sandbox_id":{"type":["string","null"],"description":"The sandbox it was taken of, while that sandbox exists"},
   "sandbox_name":{"type":"string","description":"That sandbox's name, kept after it is removed (SANDBOX:NAME refers to the snapshot); the image name for templates"},
   "image":{"type":"string"},"image_digest":{"type":"string"},"vcpus":{"type":"integer"},"memory_mib":{"type":"integer"},"disk_mib":{"type":"integer"},
   "size_bytes":{"type":"integer","description":"Bytes its files take on disk"},"created_at":{"type":"integer","description":"Unix seconds"},
   "qemu":{"type":"string","description":"QEMU version it was saved with; a restore needs the same"},"accel":{"type":"string","description":"Accelerator it was saved with; a restore needs the same"},
   "kernel":{"type":"string","description":"Guest kernel release; a restore needs the same"},"initramfs":{"type":"string","description":"Initramfs build (its name carries the agent's digest); a restore needs the same"},
   "dependents":{"type":"array","items":{"type":"string"},"description":"Names of the sandboxes restored from it; it cannot be removed before them"}}},
 "Revert":{"type":"object","additionalProperties":False,"required":["snapshot"],"properties":{"snapshot":{"type":"string","description":"One of the sandbox's own snapshots: its name, SANDBOX:NAME or id"}}},
 "Fork":{"type":"object","additionalProperties":False,"properties":{"count":{"type":"integer","minimum":1,"maximum":64,"default":1},
   "name_prefix":{"type":"string","description":"The new sandboxes are named PREFIX1 to PREFIXN [default: SANDBOX-fork-]"},
   "snapshot":{"type":"string","description":"Fork from this snapshot of the sandbox; without it a snapshot of its current state is taken first (named fork-<unix ms>), which needs it running"}}},
 "Forked":{"type":"object","required":["snapshot","sandboxes"],"properties":{"snapshot":ref("SnapshotInfo"),"sandboxes":{"type":"array","items":ref("SandboxInfo")}}},
 "RenewLease":{"type":"object","additionalProperties":False,"required":["ttl_secs"],"properties":{"ttl_secs":{"type":"integer","minimum":1}}},
 "LifecycleEntry":{"type":"object","required":["version","phase","at_ms"],"properties":{"version":{"type":"integer"},"phase":ref("Phase"),"at_ms":{"type":"integer"},"error":opt("string")}},
 "Event":{"type":"object","required":["seq","at_ms","kind","message"],"properties":{"seq":{"type":"integer"},"at_ms":{"type":"integer"},"sandbox":opt("string"),"kind":{"type":"string"},"message":{"type":"string"}}},
 "Reclaimed":{"type":"object","required":["sandboxes","processes","paths"],"properties":{"sandboxes":{"type":"array","items":{"type":"string"}},"processes":{"type":"array","items":{"type":"integer"}},"paths":{"type":"array","items":{"type":"string"}}}},
 "Health":{"type":"object","required":["version","pid","accel","accel_reason","qemu_version","kernel","kernel_path","sandboxes","max_sandboxes"],"properties":{"version":{"type":"string"},"pid":{"type":"integer"},"accel":{"type":"string"},"accel_reason":{"type":"string"},"qemu_version":{"type":"string"},"kernel":{"type":"string"},"kernel_path":{"type":"string"},"sandboxes":{"type":"integer"},"max_sandboxes":{"type":"integer"}}},
 "ImageInfo":{"type":"object","required":["name","digest","size_bytes","env","entrypoint","cmd","source","created_at"],"properties":{"name":{"type":"string"},"digest":{"type":"string"},"size_bytes":{"type":"integer"},
   "env":{"type":"array","items":{"type":"array","items":{"type":"string"},"minItems":2,"maxItems":2}},"working_dir":opt("string"),"user":opt("string"),"entrypoint":{"type":"array","items":{"type":"string"}},"cmd":{"type":"array","items":{"type":"string"}},
   "source":{"type":"string","description":"pull REF@DIGEST, import, build debian:SUITE +PACKAGES, or built-in"},"created_at":{"type":"integer","description":"Unix seconds"}}},
 "PullImage":{"type":"object","additionalProperties":False,"required":["reference"],"properties":{"reference":{"type":"string","description":"[REGISTRY/]REPOSITORY[:TAG][@DIGEST]"},"name":opt("string"),
   "insecure":{"type":"boolean","default":False,"description":"Allow plain http to a registry not on loopback"},"username":opt("string"),"password":opt("string")}},
 "BuildImage":{"type":"object","additionalProperties":False,"required":["name","from"],"properties":{"name":{"type":"string"},"from":{"type":"string","description":"debian:bookworm, debian:12 or bookworm"},"packages":{"type":"array","items":{"type":"string"}}}},
 "ImageProgress":{"oneOf":[{"type":"object","required":["type","message"],"properties":{"type":{"const":"progress"},"message":{"type":"string"}}},
   {"type":"object","required":["type","digest","done","total"],"properties":{"type":{"const":"layer"},"digest":{"type":"string"},"done":{"type":"integer"},"total":{"type":"integer"}}},
   {"type":"object","required":["type","image"],"properties":{"type":{"const":"done"},"image":ref("ImageInfo")}},
   {"type":"object","required":["type","error"],"properties":{"type":{"const":"error"},"error":ref("ApiError")}}]},
 "FileInfo":{"type":"object","required":["path","kind","size","mode","uid","gid","mtime"],"properties":{"path":{"type":"string"},"kind":{"type":"string","enum":["file","dir","symlink","other"]},"size":{"type":"integer"},"mode":{"type":"integer","description":"Permission bits"},"uid":{"type":"integer"},"gid":{"type":"integer"},"mtime":{"type":"integer","description":"Unix seconds"},"target":{"type":"string","description":"Where a symlink points"}}},
 "Listing":{"type":"object","required":["entries"],"properties":{"entries":{"type":"array","items":ref("FileInfo")}}},
 "FsEvent":{"type":"object","required":["event","path"],"properties":{"event":{"type":"string","enum":["create","modify","delete","move_from","move_to","attrib","overflow"]},"path":{"type":"string"},"dir":{"type":"boolean"}}},
 "MakeDir":{"type":"object","additionalProperties":False,"required":["path"],"properties":{"path":{"type":"string"},"parents":{"type":"boolean","default":False},"mode":{"type":["integer","null"]}}},
 "RemovePath":{"type":"object","additionalProperties":False,"required":["path"],"properties":{"path":{"type":"string"},"recursive":{"type":"boolean","default":False}}},
 "RenamePath":{"type":"object","additionalProperties":False,"required":["from","to"],"properties":{"from":{"type":"string"},"to":{"type":"string"}}},
 "ChangeMode":{"type":"object","additionalProperties":False,"required":["path","mode"],"properties":{"path":{"type":"string"},"mode":{"type":"integer","minimum":0,"maximum":4095}}},
 "StartProcess":{"type":"object","additionalProperties":False,"required":["argv"],"properties":{"argv":{"type":"array","items":{"type":"string"},"minItems":1},"env":{"type":"array","items":{"type":"array","items":{"type":"string"},"minItems":2,"maxItems":2}},"cwd":opt("string"),"user":opt("string")}},
 "ProcessStarted":{"type":"object","required":["pid"],"properties":{"pid":{"type":"integer"}}},
 "KillProcess":{"type":"object","additionalProperties":False,"properties":{"signal":{"type":"integer","minimum":1,"maximum":64,"default":15}}},
 "JobInfo":{"type":"object","required":["pid","argv","started_at","output_bytes","dropped_bytes"],"properties":{"pid":{"type":"integer"},"argv":{"type":"array","items":{"type":"string"}},"started_at":{"type":"integer"},
   "exit":{"oneOf":[{"type":"null"},{"type":"object","properties":{"code":{"type":["integer","null"]},"signal":{"type":["integer","null"]},"timed_out":{"type":"boolean"}}}]},"output_bytes":{"type":"integer"},"dropped_bytes":{"type":"integer"}}},
 "ErrorCode":{"type":"string","enum":["not_found","ambiguous_ref","name_taken","invalid_request","body_too_large","invalid_phase","lease_expired","limit_reached","boot_failed","exec_failed","registry_failed","permission_denied","in_use","incompatible","internal"],
   "description":"not_found 404, ambiguous_ref 400, invalid_request 400, name_taken 409, invalid_phase 409, lease_expired 409, in_use 409 (something still builds on what was to be removed), incompatible 409 (a snapshot saved with another QEMU, accelerator, kernel or agent build), body_too_large 413, limit_reached 429, boot_failed/exec_failed/internal 500, registry_failed 502, permission_denied 403"},
 "ApiError":{"type":"object","required":["code","message","hint"],"properties":{"code":ref("ErrorCode"),"message":{"type":"string"},"hint":{"type":"string"}}},
 "ExecStart":{"type":"object","additionalProperties":False,"properties":{"argv":{"type":"array","items":{"type":"string"},"description":"Empty: the image's Entrypoint and Cmd"},
   "env":{"type":"array","items":{"type":"array","items":{"type":"string"},"minItems":2,"maxItems":2}},"cwd":opt("string"),"user":opt("string"),"timeout_ms":{"type":["integer","null"]},
   "stdin":{"type":"boolean","default":False},"remove_sandbox_after":{"type":"boolean","default":False},
   "max_output_bytes":{"type":["integer","null"],"description":"Stop sending output after this many bytes; the process runs on and a marker line on stderr says so"},
   "tty":{"oneOf":[{"type":"null"},ref("TtySize")],"description":"Run on a terminal of this size: one output stream (stdout); Ctrl-C typed as input becomes SIGINT"}}},
 "TtySize":{"type":"object","additionalProperties":False,"required":["rows","cols"],"properties":{"rows":{"type":"integer","minimum":1,"maximum":65535},"cols":{"type":"integer","minimum":1,"maximum":65535}}},
 "ExecClientMessage":{"oneOf":[{"type":"object","required":["type","signal"],"properties":{"type":{"const":"signal"},"signal":{"type":"integer","minimum":1,"maximum":64}}},{"type":"object","required":["type"],"properties":{"type":{"const":"stdin_eof"}}},
   {"type":"object","required":["type","rows","cols"],"properties":{"type":{"const":"resize"},"rows":{"type":"integer","minimum":1},"cols":{"type":"integer","minimum":1}}}]},
 "ExecServerMessage":{"oneOf":[{"type":"object","required":["type","pid"],"properties":{"type":{"const":"started"},"pid":{"type":"integer"}}},
   {"type":"object","required":["type","timed_out"],"properties":{"type":{"const":"exit"},"code":{"type":["integer","null"]},"signal":{"type":["integer","null"]},"timed_out":{"type":"boolean"}}},
   {"type":"object","required":["type","error"],"properties":{"type":{"const":"error"},"error":ref("ApiError")}}]},
}
doc={"openapi":"3.1.0","info":{"title":"moat daemon API","version":"1","description":"REST + JSON over the daemon's unix socket ($MOAT_HOME/moat.sock), or TCP with `Authorization: Bearer <token>` ($MOAT_HOME/token) when `moat serve --tcp` is used. Errors carry HTTP status + stable code + message + hint."},"paths":paths,"components":{"schemas":schemas}}
print(json.dumps(doc,indent=2))
