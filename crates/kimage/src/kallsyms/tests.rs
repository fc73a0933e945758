//! Tests of the kallsyms reader on tables built here (laid out as
//! scripts/kallsyms writes them), then on the same tables lying.

use super::*;

/// Where the addresses go.
#[derive(Clone, Copy, PartialEq)]
enum Layout {
    /// Base-relative offsets before the count (up to Linux 6.1).
    OffsetsFirst,
    /// Base-relative offsets after the token index (later kernels).
    OffsetsLast,
    /// Absolute `u64` addresses before the count.
    Absolute,
}

const BASE: u64 = 0xffff_ffff_8100_0000;

/// Token `i`: printable characters stand for themselves; 1 is "init_",
/// 2 is "task", the others are unused multi-character tokens.
fn token(i: usize) -> Vec<u8> {
    match i {
        1 => b"init_".to_vec(),
        2 => b"task".to_vec(),
        0x21..=0x7e => vec![i as u8],
        _ => format!("~{i:02x}").into_bytes(),
    }
}

/// `text` as token numbers: "init_" and "task" compressed, the rest as is.
fn encode(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < text.len() {
        if text[i..].starts_with(b"init_") {
            out.push(1);
            i += 5;
        } else if text[i..].starts_with(b"task") {
            out.push(2);
            i += 4;
        } else {
            out.push(text[i]);
            i += 1;
        }
    }
    out
}

fn align8(v: &mut Vec<u8>) {
    while v.len() % 8 != 0 {
        v.push(0);
    }
}

/// The tables for `syms` (address, type, name), after some unrelated bytes
/// that hold the digits' pattern once (a decoy token table).
fn build(syms: &[(u64, char, String)], layout: Layout) -> Vec<u8> {
    let mut v = b"rodata before\0".to_vec();
    v.extend_from_slice(b"/\x000\x001\x002\x003\x004\x005\x006\x007\x008\x009\x00:");
    align8(&mut v);
    let offsets = |v: &mut Vec<u8>| {
        for &(a, _, _) in syms {
            let o: i32 = if a >= BASE { -((a - BASE + 1) as i32) } else { a as i32 };
            v.extend_from_slice(&o.to_le_bytes());
        }
        align8(v);
        v.extend_from_slice(&BASE.to_le_bytes());
    };
    match layout {
        Layout::OffsetsFirst => offsets(&mut v),
        Layout::Absolute => syms.iter().for_each(|&(a, _, _)| v.extend_from_slice(&a.to_le_bytes())),
        Layout::OffsetsLast => {}
    }
    v.extend_from_slice(&(syms.len() as u32).to_le_bytes());
    align8(&mut v);
    let names_at = v.len();
    let mut markers = Vec::new();
    for (k, (_, kind, name)) in syms.iter().enumerate() {
        if k % 256 == 0 {
            markers.push((v.len() - names_at) as u32);
        }
        let mut text = vec![*kind as u8];
        text.extend_from_slice(name.as_bytes());
        let enc = encode(&text);
        if enc.len() > 127 {
            v.push(0x80 | (enc.len() & 0x7f) as u8);
            v.push((enc.len() >> 7) as u8);
        } else {
            v.push(enc.len() as u8);
        }
        v.extend_from_slice(&enc);
    }
    align8(&mut v);
    markers.iter().for_each(|m| v.extend_from_slice(&m.to_le_bytes()));
    align8(&mut v);
    let table = v.len();
    let mut index = Vec::new();
    for i in 0..256 {
        index.push((v.len() - table) as u16);
        v.extend_from_slice(&token(i));
        v.push(0);
    }
    align8(&mut v);
    index.iter().for_each(|i| v.extend_from_slice(&i.to_le_bytes()));
    align8(&mut v);
    if layout == Layout::OffsetsLast {
        offsets(&mut v);
    }
    v.extend_from_slice(b"rodata after\0\0\0\0");
    v
}

fn sample() -> Vec<(u64, char, String)> {
    vec![
        (0, 'A', "fixed_percpu_data".into()),
        (0x1fb80, 'A', "current_task".into()),
        (BASE, 'T', "_text".into()),
        (BASE + 0x10, 't', "init_post".into()),
        (BASE + 0x2000, 'D', "init_task".into()),
        (BASE + 0x2000, 'd', "task_list_9".into()),
        (BASE + 0x40_0000, 'B', "_end".into()),
    ]
}

fn as_tuples(syms: &[Symbol]) -> Vec<(u64, char, String)> {
    syms.iter().map(|s| (s.addr, s.kind, s.name.clone())).collect()
}

#[test]
fn reads_the_tables_in_each_layout() {
    for layout in [Layout::OffsetsFirst, Layout::OffsetsLast, Layout::Absolute] {
        let data = build(&sample(), layout);
        let got = kallsyms(&data).unwrap();
        assert_eq!(as_tuples(&got), sample());
    }
}

#[test]
fn many_symbols_use_every_marker_and_long_names_two_length_bytes() {
    let mut syms = sample();
    let long = "x".repeat(300);
    for k in 0..700u64 {
        let name = if k == 513 { long.clone() } else { format!("init_fn_{k}") };
        syms.push((BASE + 0x40_0000 + k * 16, 't', name));
    }
    let data = build(&syms, Layout::OffsetsFirst);
    let got = kallsyms(&data).unwrap();
    assert_eq!(got.len(), syms.len());
    assert_eq!(as_tuples(&got), syms);
    assert_eq!(got[7 + 513].name.len(), 300);
}

#[test]
fn names_longer_than_the_kernel_allows_are_dropped() {
    let mut syms = sample();
    syms.push((BASE + 0x50_0000, 't', "y".repeat(MAX_NAME + 1)));
    let got = kallsyms(&build(&syms, Layout::OffsetsFirst)).unwrap();
    assert_eq!(as_tuples(&got), sample());
}

#[test]
fn markers_that_disagree_find_no_names() {
    let mut syms = sample();
    for k in 0..300u64 {
        syms.push((BASE + 0x40_0000 + k, 't', format!("f{k}")));
    }
    let mut data = build(&syms, Layout::OffsetsFirst);
    // The second marker (symbol 256's entry) is the u32 just before the
    // 8-aligned token table's... find it from the first marker (0).
    let table = data.windows(5).position(|w| w == b"init_").unwrap() - 1 - "~00\0".len();
    let markers = table - 8;
    assert_ne!(u32::from_le_bytes(data[markers + 4..markers + 8].try_into().unwrap()), 0);
    data[markers + 4] ^= 1;
    let e = kallsyms(&data).unwrap_err();
    assert!(matches!(e, Error::NoKallsyms { .. }), "{e}");
    assert!(e.to_string().contains("markers"), "{e}");
}

#[test]
fn unsorted_addresses_are_refused() {
    let mut syms = sample();
    syms.swap(2, 4);
    let e = kallsyms(&build(&syms, Layout::OffsetsFirst)).unwrap_err();
    assert!(e.to_string().contains("sorted"), "{e}");
}

#[test]
fn no_token_table_is_an_error() {
    let e = kallsyms(b"nothing like a kernel here").unwrap_err();
    assert!(e.to_string().contains("token table"), "{e}");
    assert!(kallsyms(&[]).is_err());
}

#[test]
fn truncated_or_corrupted_tables_never_panic() {
    let data = build(&sample(), Layout::OffsetsFirst);
    for cut in 0..data.len() {
        if let Ok(syms) = kallsyms(&data[..cut]) {
            assert_eq!(as_tuples(&syms), sample(), "a cut at {cut} read something else");
        }
    }
    for at in 0..data.len() {
        for x in [0x01u8, 0x80, 0xff] {
            let mut d = data.clone();
            d[at] ^= x;
            if let Ok(syms) = kallsyms(&d) {
                assert!(syms.len() <= sample().len(), "corrupting byte {at} made up symbols");
            }
        }
    }
}

#[test]
fn the_search_stops_when_its_work_is_spent() {
    let mut syms = sample();
    for k in 0..1000u64 {
        syms.push((BASE + 0x40_0000 + k, 't', format!("f{k}")));
    }
    let data = build(&syms, Layout::OffsetsFirst);
    let tokens = token_tables(&data).next().unwrap();
    assert!(find_names(&data, &tokens, &mut 500).is_none(), "1007 entries read with work for 500");
    let mut work = 5000;
    assert_eq!(find_names(&data, &tokens, &mut work).unwrap().entries.len(), syms.len());
    assert!(work <= 5000 - syms.len());
}

/// The test kernel scripts/linux builds keeps `.symtab` and has kallsyms
/// (text symbols only): every symbol its kallsyms give is in `.symtab`,
/// address, letter and name alike, and `.rodata` alone holds the tables.
#[test]
fn the_test_kernel_kallsyms_agree_with_its_symtab() {
    let path = std::env::var_os("UKVMI_LINUX_KERNEL")
        .expect("UKVMI_LINUX_KERNEL is not set: run scripts/linux (or scripts/test, which exports it)");
    let f = std::fs::read(&path).unwrap_or_else(|e| panic!("reading the test kernel {path:?}: {e}"));
    let elf = Elf::parse(&f).unwrap();
    let symtab: std::collections::HashSet<(u64, char, String)> =
        elf.symbols().unwrap().into_iter().map(|s| (s.addr, s.kind, s.name)).collect();
    let ks = elf.kallsyms().unwrap();
    assert!(ks.len() > 5_000, "only {} kallsyms", ks.len());
    for s in &ks {
        assert!(symtab.contains(&(s.addr, s.kind, s.name.clone())), "kallsyms' {s:?} is not in .symtab");
    }
    for name in ["_text", "start_kernel", "kthreadd", "entry_SYSCALL_64"] {
        assert!(ks.iter().any(|s| s.name == name), "{name} is not in kallsyms");
    }
    assert_eq!(kallsyms(&f).unwrap(), ks, "the whole file gives what .rodata gives");
}

#[test]
fn a_file_of_decoys_finds_nothing() {
    // The digits' tokens a hundred thousand times, and a long run without
    // any NUL before them: no token table.
    let mut data = vec![b'x'; 1 << 16];
    data.extend(DIGITS.repeat(100_000));
    let e = kallsyms(&data).unwrap_err();
    assert!(e.to_string().contains("token table"), "{e}");
    // Real tables after the decoys are still found within the site budget.
    let mut data = DIGITS.repeat(100);
    data.extend(build(&sample(), Layout::OffsetsFirst));
    assert_eq!(as_tuples(&kallsyms(&data).unwrap()), sample());
}
