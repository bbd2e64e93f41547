//! A small ext4 file system in an image file, loop-mounted: where the
//! power-cut and disk-full tests put the daemon's data. Needs root and a
//! loop device; `LoopFs::new` says why not when it cannot, and in CI
//! (`CI` set) that is a failure, never a silent skip.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

pub struct LoopFs {
    pub image: PathBuf,
    pub mount: PathBuf,
    dev: String,
}

fn run(cmd: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(cmd).args(args).output().map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(format!("{cmd} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl LoopFs {
    /// Makes an ext4 image of `mib` MiB in `dir` and mounts it. `Err` says
    /// why it cannot run here.
    pub fn create(dir: &Path, mib: u64) -> Result<LoopFs, String> {
        if run("id", &["-u"])? != "0" {
            return Err("not root".into());
        }
        let image = dir.join("fs.img");
        let file = std::fs::File::create(&image).map_err(|e| e.to_string())?;
        file.set_len(mib << 20).map_err(|e| e.to_string())?;
        run("mkfs.ext4", &["-q", "-F", "-m", "0", image.to_str().unwrap()])?;
        let mount = dir.join("mnt");
        std::fs::create_dir_all(&mount).map_err(|e| e.to_string())?;
        LoopFs::attach(&image, &mount)
    }

    /// Mounts an existing image (a copy taken at a "power cut": mounting it
    /// replays its journal, as booting after the cut would).
    pub fn attach(image: &Path, mount: &Path) -> Result<LoopFs, String> {
        std::fs::create_dir_all(mount).map_err(|e| e.to_string())?;
        let dev = run("losetup", &["-f", "--show", image.to_str().unwrap()])?;
        if let Err(e) = run("mount", &["-t", "ext4", &dev, mount.to_str().unwrap()]) {
            let _ = run("losetup", &["-d", &dev]);
            return Err(e);
        }
        Ok(LoopFs { image: image.to_owned(), mount: mount.to_owned(), dev })
    }

    /// What a power cut leaves: the image as the block device has it, copied
    /// while `daemon` is stopped (SIGSTOP, every thread out of its syscalls),
    /// so the copy is one moment. The page cache of the mounted file system
    /// is not in it: only what was written back or synced is.
    /// `while_stopped` runs once the daemon is stopped, before the copy.
    pub fn cut_with(&self, daemon: &Child, to: &Path, while_stopped: impl FnOnce()) {
        let pid = daemon.id().to_string();
        run("kill", &["-STOP", &pid]).unwrap();
        wait_all_stopped(daemon.id());
        while_stopped();
        run("cp", &["--sparse=always", self.image.to_str().unwrap(), to.to_str().unwrap()]).unwrap();
        run("kill", &["-CONT", &pid]).unwrap();
    }

    /// The same copy, for a test that holds the store in its own process
    /// and knows nothing of it writes meanwhile.
    pub fn cut_here(&self, to: &Path) {
        run("cp", &["--sparse=always", self.image.to_str().unwrap(), to.to_str().unwrap()]).unwrap();
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        for _ in 0..50 {
            if run("umount", &[self.mount.to_str().unwrap()]).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = run("losetup", &["-d", &self.dev]);
    }
}

/// Waits until every thread of `pid` is in the stopped state. A thread in
/// a sync stops only once the sync returns, which on a loaded machine can
/// take seconds.
fn wait_all_stopped(pid: u32) {
    for _ in 0..5000 {
        let all = std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|tasks| {
                tasks.flatten().all(|t| {
                    std::fs::read_to_string(t.path().join("stat"))
                        .map(|s| s.rsplit(')').next().unwrap_or("").trim_start().starts_with('T'))
                        .unwrap_or(true)
                })
            })
            .unwrap_or(true);
        if all {
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    panic!("process {pid} did not stop");
}

/// A loop file system, or `None` with the reason printed loudly; in CI it
/// must run.
pub fn loop_fs_or_skip(dir: &Path, mib: u64, test: &str) -> Option<LoopFs> {
    match LoopFs::create(dir, mib) {
        Ok(fs) => Some(fs),
        Err(why) => crate::helpers::skip_outside_ci(test, &format!("needs root and a loop device ({why})")),
    }
}
