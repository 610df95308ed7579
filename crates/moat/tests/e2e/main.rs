//! moat's end-to-end tests, one binary: each module is one area. They boot real VMs under real
//! QEMU, run a real registry and real servers on loopback or in network namespaces they create.
//! One binary links once and keeps both test threads busy to the end, where one binary per area
//! ran each area's slowest test alone.

mod common;
mod oci;
mod registry;

mod api_conformance;
mod cli_habits;
mod cli_reference;
mod config;
mod daemon;
mod doctor;
mod e2b;
mod exec;
mod files;
mod images;
mod isolation;
mod labels;
mod mcp;
mod metrics;
mod mounts;
mod net;
mod net_bypass;
mod pool;
mod port_connect;
mod processes;
mod pull;
mod registry_harness;
mod remote;
mod run;
mod secrets_store;
mod security_cp;
mod security_crash;
mod security_guest;
mod security_local;
mod security_misc;
mod service;
mod snapshot_lib;
mod snapshots;
mod state;
mod tty;
mod volumes;
