//! Writes every target's seed inputs to `fuzz/seeds/<target>/<name>`
//! (`cargo run --manifest-path fuzz/Cargo.toml --example gen_seeds`).
//! The seeds are committed; rerun this after changing `src/seeds.rs`.

fn main() -> std::io::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    for (target, seeds) in ukvmi_fuzz::seeds::all() {
        let dir = root.join(target);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::create_dir_all(&dir)?;
        for (name, bytes) in &seeds {
            std::fs::write(dir.join(name), bytes)?;
        }
        println!("{target}: {} seeds in {}", seeds.len(), dir.display());
    }
    Ok(())
}
