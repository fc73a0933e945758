//! The commands that read the guest's own structures: `ps` (the demo OS's
//! process table, or a Linux guest's task list) and `symbols` (the guest's symbol map: all of it, names
//! matching a pattern, or lookups).

use std::io;

use ukvmi_monitor::{
    guestos::{self, linux::TaskList, ProcessTable},
    json::{self, Obj},
    symbols::parse_number,
};

use super::{Args, Ctx, Failure, Out};

/// Prints the process table (text or JSON).
pub fn print_ps(t: &ProcessTable, json_out: bool, out: &mut dyn Out) -> io::Result<()> {
    if json_out {
        let procs = json::array(t.procs.iter().map(guestos::Process::to_json));
        let cur = json::array(t.current.iter().map(u32::to_string));
        return out.line(
            &Obj::new()
                .num("ticks", t.ticks)
                .num("ncpus", u64::from(t.ncpus))
                .raw("current", &cur)
                .raw("processes", &procs)
                .build(),
        );
    }
    out.line(&format!("{:>4}  {:<10} {:<9} {:>4}  {:>18}  {:>9}", "PID", "NAME", "STATE", "CPU", "CR3", "SYSCALLS"))?;
    for p in &t.procs {
        let on = if t.current.get(p.cpu as usize) == Some(&p.pid) { "*" } else { " " };
        out.line(&format!(
            "{:>4}{on} {:<10} {:<9} {:>4}  {:>#18x}  {:>9}",
            p.pid,
            p.name,
            p.state.name(),
            p.cpu,
            p.cr3,
            p.syscalls
        ))?;
    }
    out.line(&format!("(* = on its vCPU now; up {:.1} s)", t.ticks as f64 / 1000.0))
}

/// Prints a Linux guest's tasks (text or JSON): `*` marks a vCPU's current
/// task, `[name]` a kernel thread, `\_ name` a thread of the process above
/// (its pid is not its TGID; `"thread":true` in JSON).
pub fn print_tasks(list: &TaskList, json_out: bool, out: &mut dyn Out) -> io::Result<()> {
    if json_out {
        let rows = json::array(list.tasks.iter().map(|t| {
            let o = Obj::new()
                .num("pid", u64::from(t.pid))
                .num("tgid", u64::from(t.tgid))
                .str("name", &t.name)
                .str("state", &t.state.to_string())
                .bool("kthread", t.kthread)
                .hex("task", t.addr);
            let o = match t.ppid {
                Some(p) => o.num("ppid", u64::from(p)),
                None => o,
            };
            let o = match t.on_cpu {
                Some(c) => o.num("cpu", u64::from(c)),
                None => o,
            };
            o.bool("thread", t.is_thread()).build()
        }));
        let o = Obj::new().str("os", "linux").raw("processes", &rows);
        let o = match &list.incomplete {
            Some(why) => o.str("incomplete", why),
            None => o,
        };
        return out.line(&o.build());
    }
    out.line(&format!("{:>6}  {:>6}  {:>6}  S  {:<16} {:>18}", "PID", "TGID", "PPID", "NAME", "TASK"))?;
    for t in &list.tasks {
        let on = if t.on_cpu.is_some() { "*" } else { " " };
        let name = match (t.kthread, t.is_thread()) {
            (true, _) => format!("[{}]", t.name),
            (false, true) => format!("\\_ {}", t.name),
            (false, false) => t.name.clone(),
        };
        let ppid = t.ppid.map_or_else(|| "?".to_string(), |p| p.to_string());
        out.line(&format!("{:>6}{on} {:>6}  {ppid:>6}  {}  {name:<16} {:>#18x}", t.pid, t.tgid, t.state, t.addr))?;
    }
    if let Some(why) = &list.incomplete {
        out.note(&format!("ukvmi: the task list may be incomplete: {why}"))?;
    }
    out.line(&format!(
        "({} tasks; * = on a vCPU now; [name] = kernel thread; \\_ name = another thread of the process above)",
        list.tasks.len()
    ))
}

pub(crate) fn ps(ctx: &Ctx<'_>, a: &Args<'_>, out: &mut dyn Out) -> Result<(), Failure> {
    if let Some(list) = ctx.mon.guest_os().task_list(ctx.mon, ctx.mon.vcpus()) {
        let list = list.map_err(|e| Failure { msg: e.to_string(), status: 1 })?;
        return Ok(print_tasks(&list, a.has("--json"), out)?);
    }
    let t = ProcessTable::read(ctx.mon).map_err(|e| Failure { msg: e.to_string(), status: 1 })?;
    Ok(print_ps(&t, a.has("--json"), out)?)
}

pub(crate) fn symbols(ctx: &Ctx<'_>, a: &Args<'_>, out: &mut dyn Out) -> Result<(), Failure> {
    let syms =
        ctx.syms.ok_or_else(|| Failure { msg: "no symbol map for this VM (give --map FILE)".into(), status: 1 })?;
    let json = a.has("--json");
    let named = |out: &mut dyn Out, name: &str, addr: u64| -> Result<(), Failure> {
        Ok(out.line(&if json {
            Obj::new().str("name", name).hex("addr", addr).build()
        } else {
            format!("{addr:#018x} {name}")
        })?)
    };
    if a.pos.is_empty() {
        for (name, addr) in syms.iter() {
            named(out, name, addr)?;
        }
        return Ok(());
    }
    for q in &a.pos {
        if let Some(addr) = syms.addr(q) {
            named(out, q, addr)?;
        } else if let Some(addr) = parse_number(q) {
            let at = syms.describe(addr);
            out.line(&if json {
                Obj::new().hex("addr", addr).str("symbol", &at).build()
            } else {
                format!("{addr:#018x} {at}")
            })?;
        } else if let Some(addr) = syms.resolve(q) {
            named(out, q, addr)?;
        } else {
            let glob = q.contains(['*', '?']);
            let mut found = false;
            for (name, addr) in syms.iter().filter(|(n, _)| if glob { glob_match(q, n) } else { n.contains(q) }) {
                found = true;
                named(out, name, addr)?;
            }
            if !found {
                return Err(Failure {
                    msg: format!("no symbol is named `{q}` or {} it", if glob { "matches" } else { "contains" }),
                    status: 1,
                });
            }
        }
    }
    Ok(())
}

/// Whether `text` matches the shell-style `pattern` as a whole: `*` is any
/// run of characters, `?` any one.
fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    // Where the last `*` was, and the text position it matched up to.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(&c) if c == '?' || Some(&c) == t.get(ti) => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    pi = sp + 1;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    p.get(pi..).is_some_and(|rest| rest.iter().all(|&c| c == '*'))
}

#[cfg(test)]
mod tests {
    use ukvmi_monitor::guestos::linux::{Task, TaskList};

    use super::{glob_match, print_tasks, Out};

    /// What a command printed: standard output's lines, then standard error's.
    #[derive(Default)]
    struct Lines(Vec<String>, Vec<String>);

    impl Out for Lines {
        fn line(&mut self, s: &str) -> std::io::Result<()> {
            self.0.push(s.to_string());
            Ok(())
        }
        fn raw(&mut self, b: &[u8]) -> std::io::Result<()> {
            self.line(&String::from_utf8_lossy(b))
        }
        fn note(&mut self, s: &str) -> std::io::Result<()> {
            self.1.push(s.to_string());
            Ok(())
        }
        fn progress(&mut self, s: &str) -> std::io::Result<()> {
            self.note(s)
        }
        fn stderr_tty(&self) -> bool {
            false
        }
        fn gone(&self) -> bool {
            false
        }
    }

    fn task(pid: u32, tgid: u32, name: &str, kthread: bool, on_cpu: Option<u16>) -> Task {
        let addr = 0xffff_8880_0020_0000 + u64::from(pid) * 0x2000;
        Task { addr, pid, tgid, name: name.into(), state: 'S', kthread, ppid: Some(1), on_cpu }
    }

    /// A leader, a kernel thread, and a process with another thread that
    /// runs on vCPU 1.
    fn list() -> TaskList {
        let tasks = vec![
            task(2, 2, "kthreadd", true, None),
            task(42, 42, "app", false, None),
            task(43, 42, "app:io", false, Some(1)),
        ];
        TaskList { tasks, incomplete: Some("the thread list of pid 42 loops back".into()) }
    }

    #[test]
    fn ps_marks_threads_in_text() {
        let mut out = Lines::default();
        print_tasks(&list(), false, &mut out).unwrap();
        assert_eq!(out.0[0], "   PID    TGID    PPID  S  NAME                           TASK");
        assert_eq!(out.0[1], "     2       2       1  S  [kthreadd]       0xffff888000204000");
        assert_eq!(out.0[2], "    42      42       1  S  app              0xffff888000254000");
        assert_eq!(out.0[3], "    43*     42       1  S  \\_ app:io        0xffff888000256000");
        assert_eq!(
            out.0[4],
            "(3 tasks; * = on a vCPU now; [name] = kernel thread; \\_ name = another thread of the process above)"
        );
        assert_eq!(out.1, ["ukvmi: the task list may be incomplete: the thread list of pid 42 loops back"]);
    }

    #[test]
    fn ps_marks_threads_in_json() {
        let mut out = Lines::default();
        print_tasks(&list(), true, &mut out).unwrap();
        assert_eq!(out.0.len(), 1);
        let rows: Vec<&str> = out.0[0].split("},{").collect();
        assert_eq!(rows.len(), 3, "{}", out.0[0]);
        assert!(rows[1].contains(r#""pid":42,"tgid":42,"name":"app","#) && rows[1].ends_with(r#""thread":false"#));
        assert!(
            rows[2].contains(r#""pid":43,"tgid":42,"name":"app:io","#)
                && rows[2].contains(r#""ppid":1,"cpu":1,"thread":true}"#),
            "{}",
            rows[2]
        );
        assert!(out.0[0].ends_with(r#""incomplete":"the thread list of pid 42 loops back"}"#), "{}", out.0[0]);
    }

    #[test]
    fn globs_match_whole_names() {
        assert!(glob_match("sys_*", "sys_write"));
        assert!(glob_match("*write*", "hooked_writes"));
        assert!(glob_match("sys_?rite", "sys_write"));
        assert!(glob_match("*", ""));
        assert!(glob_match("a*b*c", "axxbyyc"));
        assert!(!glob_match("sys_*", "do_sys_write"));
        assert!(!glob_match("sys_?", "sys_write"));
        assert!(!glob_match("a*b", "axxbyy"));
    }
}
