//! A CPU quota for test processes (cgroup v1 `cpu` controller): the way these tests make a
//! provider slow, since this kernel has no `netem`. The group is created with a name unique to
//! the run and removed on drop (its processes are moved back to the root group first).

use std::path::PathBuf;

use anyhow::Context;

const ROOT: &str = "/sys/fs/cgroup/cpu";

pub struct CpuLimit {
    dir: PathBuf,
}

impl CpuLimit {
    /// A group whose processes together get at most `quota_us` of CPU per `period_us`.
    pub fn new(tag: &str, quota_us: u64, period_us: u64) -> anyhow::Result<CpuLimit> {
        let dir = PathBuf::from(ROOT).join(format!("foldmesh-test-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| {
            format!(
                "cannot create {} (cgroup v1 cpu controller, root)",
                dir.display()
            )
        })?;
        let limit = CpuLimit { dir };
        limit.write("cpu.cfs_period_us", &period_us.to_string())?;
        limit.write("cpu.cfs_quota_us", &quota_us.to_string())?;
        Ok(limit)
    }

    fn write(&self, file: &str, value: &str) -> anyhow::Result<()> {
        let p = self.dir.join(file);
        std::fs::write(&p, value)
            .with_context(|| format!("cannot write {value} to {}", p.display()))
    }

    /// Put process `pid` (all its threads) in the group.
    pub fn add(&self, pid: u32) -> anyhow::Result<()> {
        self.write("cgroup.procs", &pid.to_string())
    }

    /// Lift the quota (processes stay in the group, unthrottled).
    pub fn lift(&self) -> anyhow::Result<()> {
        self.write("cpu.cfs_quota_us", "-1")
    }
}

impl Drop for CpuLimit {
    fn drop(&mut self) {
        let _ = self.lift();
        if let Ok(procs) = std::fs::read_to_string(self.dir.join("cgroup.procs")) {
            for pid in procs.lines() {
                let _ = std::fs::write(PathBuf::from(ROOT).join("cgroup.procs"), pid);
            }
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}
