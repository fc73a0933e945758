//! Unit tests of the command table and the whole help built from it.

use super::*;

#[test]
fn names_are_unique() {
    for (i, c) in COMMANDS.iter().enumerate() {
        assert!(COMMANDS.iter().skip(i + 1).all(|d| d.name != c.name), "{} twice", c.name);
    }
}

#[test]
fn help_lists_every_visible_command_once() {
    let h = help();
    for c in COMMANDS.iter().filter(|c| c.section != Section::Hidden) {
        assert!(h.contains(&format!("    {}", if c.section == Section::Tool { c.name } else { "ukvmi " })));
        assert!(h.contains(c.about), "{}", c.name);
    }
    assert!(!h.contains("hold the KVMI connection"));
}
