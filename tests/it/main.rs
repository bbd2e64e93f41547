//! Black-box tests: the real daemon, real HTTP on 127.0.0.1, temp data dirs.
//! Timer-driven cases run on tokio's paused clock, so "10 s of debounce"
//! costs no wall-clock time. The crash test runs the real binary.

mod appliance;
mod architecture;
mod backup;
mod batching;
mod check;
mod contexts;
mod disk_full;
mod docs;
mod chaos;
mod console;
mod crash;
mod damage;
mod cutting;
mod exposure;
mod faults;
mod gateways;
mod helpers;
mod input;
mod loopfs;
mod powercut;
mod retention;
mod senders;
mod receipts;
mod replay;
mod reply_cap;
mod systemd;
mod takeover;
mod lifecycle;
mod memory;
mod limits;
mod litellm;
mod monitoring;
mod package;
mod tidy;
mod store_api;
mod legacy;
