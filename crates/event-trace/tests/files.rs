//! With `UKVMI_EVENT_TRACE` set, each side's records go to its own file as
//! `seq point ns id` lines, on the shared monotonic clock. (One test: the
//! variable is read once per process.)
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

use ukvmi_event_trace::{stamp, Point, Trace};

static VMM: Trace = Trace::new("vmm");
static TOOL: Trace = Trace::new("tool");

fn lines(path: &str) -> Vec<Vec<u64>> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines().map(|l| l.split(' ').map(|x| x.parse().unwrap()).collect()).collect()
}

#[test]
fn each_side_appends_its_own_records() {
    let dir = std::env::temp_dir().join(format!("ukvmi-event-trace-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let prefix = dir.join("t").display().to_string();
    std::env::set_var("UKVMI_EVENT_TRACE", &prefix);

    let before = stamp();
    assert_ne!(before, 0, "tracing is on: stamp reads the clock");
    VMM.mark(7, Point::VcpuSends, 12);
    TOOL.mark(7, Point::ToolReceives, 0);
    VMM.mark_at(7, Point::VcpuBuilds, before);
    VMM.flush();
    TOOL.flush();
    VMM.mark(8, Point::VcpuResumes, 3);
    VMM.flush();

    let vmm = lines(&format!("{prefix}.vmm"));
    assert_eq!(vmm.len(), 3, "{vmm:?}");
    assert_eq!((vmm[0][0], vmm[0][1], vmm[0][3]), (7, 0, 12));
    assert!(vmm[0][2] >= before);
    assert_eq!(vmm[1], [7, 7, before, 0], "mark_at keeps the given time");
    assert_eq!((vmm[2][0], vmm[2][1], vmm[2][3]), (8, 6, 3), "a later flush appends");
    let tool = lines(&format!("{prefix}.tool"));
    assert_eq!(tool.len(), 1, "{tool:?}");
    assert_eq!((tool[0][0], tool[0][1]), (7, 1));
    assert!(tool[0][2] >= vmm[0][2], "one clock for both sides");
    std::fs::remove_dir_all(&dir).unwrap();
}
