//! Talking to systemd: `READY=1` once recovery is done, `WATCHDOG=1` pings,
//! `STOPPING=1` on shutdown. The notify protocol is one datagram to the
//! socket in `$NOTIFY_SOCKET` (a path, or an abstract name starting with
//! `@`); without the variable (not under systemd) every call does nothing.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Sends one notification; false when not under systemd or it failed.
pub fn notify(state: &str) -> bool {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return false;
    };
    let Ok(socket) = UnixDatagram::unbound() else {
        return false;
    };
    let sent = match target.as_bytes().strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name)
                .and_then(|addr| socket.send_to_addr(state.as_bytes(), &addr))
        }
        None => socket.send_to(state.as_bytes(), &target),
    };
    sent.is_ok()
}

/// Half the watchdog interval systemd asked for, if it asked this process.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Some(pid) = std::env::var("WATCHDOG_PID").ok().and_then(|p| p.parse::<u32>().ok()) {
        if pid != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// Pings the watchdog until `stop`. Runs on the runtime, so a runtime that
/// stops making progress stops the pings and systemd restarts the daemon.
pub async fn watchdog(every: Duration, stop: CancellationToken) {
    loop {
        notify("WATCHDOG=1");
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Lowers the calling thread's priority to nice 10, so work it does in the
/// background (a backup, a store rewrite) yields the cores to ingest. On
/// Linux a nice value belongs to a thread: only this one changes.
pub fn background_priority() {
    // SAFETY: plain syscalls on this thread's own id; failure only leaves
    // the priority as it was.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 10);
    }
}
