//! Assembles the guests in `asm/` into flat binaries with gcc, ld and objcopy
//! (Debian packages `gcc` and `binutils`), and writes `$OUT_DIR/guests.rs`:
//! one module per guest with its image, entry point and symbol table (`nm`).

use std::{
    env,
    fmt::Write as _,
    fs,
    io::ErrorKind,
    path::{Path, PathBuf},
    process::{self, Command},
};

struct GuestSrc {
    /// Guest name: `src/lib.rs` refers to it as a module of the generated file.
    name: &'static str,
    /// Source file in asm/.
    src: &'static str,
    /// Extra preprocessor definitions (GUEST_NAME is always defined).
    defines: &'static [(&'static str, &'static str)],
    /// Also write `$OUT_DIR/<name>.map`, a System.map of every symbol.
    system_map: bool,
}

const GUESTS: &[GuestSrc] = &[
    GuestSrc { name: "spin", src: "spin.S", defines: &[], system_map: false },
    GuestSrc { name: "smp", src: "smp.S", defines: &[], system_map: false },
    GuestSrc { name: "msr", src: "msr.S", defines: &[], system_map: false },
    GuestSrc { name: "traps", src: "traps.S", defines: &[], system_map: false },
    GuestSrc { name: "bench", src: "bench.S", defines: &[], system_map: false },
    GuestSrc { name: "pf", src: "pf.S", defines: &[], system_map: false },
    GuestSrc { name: "poweroff", src: "poweroff.S", defines: &[("EXIT_STATUS", "0")], system_map: false },
    GuestSrc { name: "poweroff7", src: "poweroff.S", defines: &[("EXIT_STATUS", "7")], system_map: false },
    GuestSrc { name: "demo", src: "demo.S", defines: &[], system_map: true },
];

/// Files every guest source #includes.
const SHARED: &[&str] = &["layout.h", "common.S", "demo.h"];

fn fail(msg: &str) -> ! {
    eprintln!("error: ukvmi-guests: {msg}");
    process::exit(1);
}

/// Runs a tool and returns its stdout; a missing tool names the package.
fn run(tool: &str, package: &str, args: &[&str]) -> String {
    let out = match Command::new(tool).args(args).output() {
        Ok(out) => out,
        Err(e) if e.kind() == ErrorKind::NotFound => fail(&format!(
            "`{tool}` not found: the guest images are built with gcc, as, ld, \
             objcopy, nm and size; install the Debian package `{package}` \
             (apt-get install gcc binutils)"
        )),
        Err(e) => fail(&format!("cannot run `{tool}`: {e}")),
    };
    if !out.status.success() {
        fail(&format!(
            "`{tool} {}` failed ({}):\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    String::from_utf8(out.stdout).unwrap_or_else(|e| fail(&format!("tool output is not UTF-8: {e}")))
}

/// Every external tool and the Debian package that provides it. `as` is only
/// run by gcc, so it is checked up front for a clear message.
const TOOLS: &[(&str, &str)] = &[
    ("gcc", "gcc"),
    ("as", "binutils"),
    ("ld", "binutils"),
    ("objcopy", "binutils"),
    ("nm", "binutils"),
    ("size", "binutils"),
];

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap_or_else(|| fail("OUT_DIR / CARGO_MANIFEST_DIR must be valid UTF-8"))
}

/// `#define NAME value` from an asm/ header.
fn layout_define(layout: &str, name: &str) -> u64 {
    for line in layout.lines() {
        let mut words = line.split_whitespace();
        if words.next() == Some("#define") && words.next() == Some(name) {
            let value = words.next().unwrap_or_default();
            let parsed = match value.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => value.parse(),
            };
            return parsed.unwrap_or_else(|_| fail(&format!("layout.h: bad value for {name}")));
        }
    }
    fail(&format!("layout.h has no #define {name}"))
}

/// Writes a System.map (`%016x T name` per line, sorted by address) of every
/// symbol the guest's object defines, data and absolute ones included.
/// Labels inside the user image (between `user_image_start` and
/// `user_image_end`) are given at the virtual address they run at in every
/// process, `user_base + offset`; the bounds themselves keep their image
/// addresses.
fn write_system_map(map: &Path, elf: &Path, own: &[&str], user_base: u64) {
    let nm = run("nm", "binutils", &["--defined-only", path_str(elf)]);
    let mut syms: Vec<(u64, &str)> = Vec::new();
    for line in nm.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let [addr, _kind, sym] = words.as_slice() else {
            continue;
        };
        if !own.contains(sym) {
            continue;
        }
        let addr = u64::from_str_radix(addr, 16).unwrap_or_else(|_| fail(&format!("nm: bad address in {line:?}")));
        syms.push((addr, sym));
    }
    let bound = |name: &str| {
        syms.iter()
            .find(|(_, s)| *s == name)
            .map(|&(a, _)| a)
            .unwrap_or_else(|| fail(&format!("system map: no {name}")))
    };
    let (start, end) = (bound("user_image_start"), bound("user_image_end"));
    let mut out: Vec<(u64, &str)> = syms
        .iter()
        .map(
            |&(a, s)| {
                if a >= start && a < end && s != "user_image_start" {
                    (user_base + (a - start), s)
                } else {
                    (a, s)
                }
            },
        )
        .collect();
    out.sort();
    let mut text = String::new();
    for (addr, sym) in out {
        writeln!(text, "{addr:016x} T {sym}").unwrap_or_else(|e| fail(&format!("formatting generated code: {e}")));
    }
    fs::write(map, text).unwrap_or_else(|e| fail(&format!("cannot write the system map: {e}")));
}

fn main() {
    let manifest = PathBuf::from(
        env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|e| fail(&format!("CARGO_MANIFEST_DIR unset: {e}"))),
    );
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap_or_else(|e| fail(&format!("OUT_DIR unset: {e}"))));
    let asm = manifest.join("asm");

    println!("cargo:rerun-if-changed=build.rs");
    for f in SHARED {
        println!("cargo:rerun-if-changed=asm/{f}");
    }
    for &(tool, package) in TOOLS {
        run(tool, package, &["--version"]);
    }

    let layout =
        fs::read_to_string(asm.join("layout.h")).unwrap_or_else(|e| fail(&format!("cannot read asm/layout.h: {e}")));
    let demo_h =
        fs::read_to_string(asm.join("demo.h")).unwrap_or_else(|e| fail(&format!("cannot read asm/demo.h: {e}")));
    // The link address and the user base come from the ABI crate; the
    // headers the assembly includes must say the same (the unit tests check
    // every other value).
    let load_addr = ukvmi_guest_abi::layout::LOAD_ADDR;
    let user_base = ukvmi_guest_abi::demo::USER_BASE;
    for (file, text, name, want) in
        [("layout.h", &layout, "LOAD_ADDR", load_addr), ("demo.h", &demo_h, "USER_BASE", user_base)]
    {
        let found = layout_define(text, name);
        if found != want {
            fail(&format!("asm/{file}: {name} is {found:#x}, ukvmi-guest-abi says {want:#x}"));
        }
    }

    let mut gen = String::from("// Generated by build.rs from asm/*.S. Do not edit.\n");
    for &GuestSrc { name, src, defines, system_map } in GUESTS {
        println!("cargo:rerun-if-changed=asm/{src}");
        let src_path = asm.join(src);
        let obj = out_dir.join(format!("{name}.o"));
        let elf = out_dir.join(format!("{name}.elf"));
        let bin = out_dir.join(format!("{name}.bin"));

        // gcc -c runs cpp (layout.h, common.S) and then as, which must not warn:
        // cargo hides build-script output, so a warning such as a truncated
        // port number has to fail the build.
        let mut gcc_args = vec![
            "-c".to_owned(),
            "-nostdinc".to_owned(),
            "-Werror".to_owned(),
            "-Wa,--fatal-warnings".to_owned(),
            format!("-DGUEST_NAME={name}"),
        ];
        gcc_args.extend(defines.iter().map(|(k, v)| format!("-D{k}={v}")));
        gcc_args.extend(["-o".to_owned(), path_str(&obj).to_owned(), path_str(&src_path).to_owned()]);
        let gcc_args: Vec<&str> = gcc_args.iter().map(String::as_str).collect();
        run("gcc", "gcc", &gcc_args);

        let ttext = format!("-Ttext=0x{load_addr:x}");
        run(
            "ld",
            "binutils",
            &[
                "-m",
                "elf_x86_64",
                "-nostdlib",
                "-static",
                "--build-id=none",
                "-z",
                "noexecstack",
                "--fatal-warnings",
                "-e",
                "_start",
                &ttext,
                "-o",
                path_str(&elf),
                path_str(&obj),
            ],
        );

        // Everything (code, strings) lives in .text; reject any other payload.
        let sizes = run("size", "binutils", &["-A", path_str(&elf)]);
        for line in sizes.lines() {
            let mut words = line.split_whitespace();
            let (Some(section), Some(size)) = (words.next(), words.next()) else {
                continue;
            };
            let data_like = [".data", ".bss", ".rodata"].iter().any(|p| section.starts_with(p));
            if data_like && size != "0" {
                fail(&format!("{src}: section {section} is not empty; keep everything in .text"));
            }
        }

        run("objcopy", "binutils", &["-O", "binary", "-j", ".text", path_str(&elf), path_str(&bin)]);
        let image_len = fs::metadata(&bin).unwrap_or_else(|e| fail(&format!("objcopy wrote no image: {e}"))).len();
        if image_len == 0 {
            fail(&format!("{src}: empty image"));
        }

        // Names come from the object (the guest's own labels, not ld's
        // __bss_start/_edata/_end), addresses from the linked ELF.
        let own = run("nm", "binutils", &["--defined-only", path_str(&obj)]);
        let own: Vec<&str> = own.lines().filter_map(|l| l.split_whitespace().nth(2)).collect();
        let mut symbols: Vec<(u64, String)> = Vec::new();
        let nm = run("nm", "binutils", &["--defined-only", path_str(&elf)]);
        for line in nm.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            let [addr, kind, sym] = words.as_slice() else {
                continue;
            };
            if !matches!(*kind, "T" | "t") || !own.contains(sym) {
                continue;
            }
            let addr = u64::from_str_radix(addr, 16).unwrap_or_else(|_| fail(&format!("nm: bad address in {line:?}")));
            if addr < load_addr || addr > load_addr + image_len {
                fail(&format!("{src}: symbol {sym} at {addr:#x} lies outside the image"));
            }
            symbols.push((addr, (*sym).to_owned()));
        }
        symbols.sort();
        let entry = match symbols.iter().find(|(_, s)| s == "_start") {
            Some(&(addr, _)) => addr,
            None => fail(&format!("{src}: no _start symbol")),
        };
        if entry != load_addr {
            fail(&format!("{src}: _start is at {entry:#x}, not at the load address {load_addr:#x}"));
        }

        if system_map {
            write_system_map(&out_dir.join(format!("{name}.map")), &elf, &own, user_base);
        }

        writeln!(gen, "\npub(crate) mod {name} {{")
            .unwrap_or_else(|e| fail(&format!("formatting generated code: {e}")));
        writeln!(
            gen,
            "    pub(crate) const IMAGE: &[u8] = include_bytes!(concat!(env!(\"OUT_DIR\"), \"/{name}.bin\"));"
        )
        .unwrap_or_else(|e| fail(&format!("formatting generated code: {e}")));
        writeln!(gen, "    pub(crate) const ENTRY: u64 = {entry:#x};")
            .unwrap_or_else(|e| fail(&format!("formatting generated code: {e}")));
        writeln!(gen, "    pub(crate) const SYMBOLS: &[(&str, u64)] = &[")
            .unwrap_or_else(|e| fail(&format!("formatting generated code: {e}")));
        for (addr, sym) in &symbols {
            writeln!(gen, "        ({sym:?}, {addr:#x}),")
                .unwrap_or_else(|e| fail(&format!("formatting generated code: {e}")));
        }
        writeln!(gen, "    ];\n}}").unwrap_or_else(|e| fail(&format!("formatting generated code: {e}")));
    }
    fs::write(out_dir.join("guests.rs"), gen)
        .unwrap_or_else(|e| fail(&format!("cannot write $OUT_DIR/guests.rs: {e}")));
}
