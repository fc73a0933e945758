//! The one command-line parser: splits a command's words into options (with
//! their values) and operands, against the option names the command table
//! declares as taking a value.
//!
//! Every command parses through [`Words`]; what an unknown option or a bad
//! value means stays with the command (its wording is part of the CLI).

use ukvmi_monitor::symbols::parse_number;

/// One option a command accepts, as the command table lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Opt {
    /// The option as typed, e.g. `--count`.
    pub name: &'static str,
    /// For an option that takes a value (the next word, or `=VALUE`), what
    /// the value is, e.g. `N`.
    pub value: Option<&'static str>,
    /// One line about it, for the command's `--help`.
    pub help: &'static str,
}

impl Opt {
    /// The same option with `help` as its line in `--help`.
    pub(crate) const fn help(self, help: &'static str) -> Opt {
        Opt { help, ..self }
    }
}

/// An option without a value.
pub(crate) const fn flag(name: &'static str) -> Opt {
    Opt { name, value: None, help: "" }
}

/// An option that takes a value, shown as `metavar` in help.
pub(crate) const fn valued(name: &'static str, metavar: &'static str) -> Opt {
    Opt { name, value: Some(metavar), help: "" }
}

/// How words are told apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Style {
    /// Every word is an option (or an option's value): `ukvmi run`, `demo`,
    /// `daemon`. A word that is no option is the command's to refuse.
    Options,
    /// Tool commands: `--name=value` works, and a word that does not start
    /// with `-` (or is `-` alone) is an operand.
    Tool,
}

/// One parsed word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Word<'a> {
    /// An option and, for a valued one, its value.
    Opt(&'a str, Option<&'a str>),
    /// An operand (tool commands only).
    Operand(&'a str),
}

/// A valued option that came last, without its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MissingValue<'a>(pub &'a str);

/// The words of a command line, one at a time (so that a command reports
/// the first problem in the order the user typed).
#[derive(Debug)]
pub(crate) struct Words<'a> {
    it: std::slice::Iter<'a, String>,
    valued: &'a [&'a str],
    style: Style,
}

impl<'a> Words<'a> {
    /// Parses `args`; the options named in `valued` take a value.
    pub(crate) fn new(args: &'a [String], valued: &'a [&'a str], style: Style) -> Words<'a> {
        Words { it: args.iter(), valued, style }
    }
}

impl<'a> Iterator for Words<'a> {
    type Item = Result<Word<'a>, MissingValue<'a>>;

    fn next(&mut self) -> Option<Self::Item> {
        let a = self.it.next()?.as_str();
        if self.style == Style::Tool {
            if let Some((k, v)) = a.split_once('=').filter(|(k, _)| k.starts_with("--")) {
                return Some(Ok(Word::Opt(k, Some(v))));
            }
        }
        if self.valued.contains(&a) {
            return Some(match self.it.next() {
                Some(v) => Ok(Word::Opt(a, Some(v.as_str()))),
                None => Err(MissingValue(a)),
            });
        }
        let is_opt = self.style == Style::Options || (a.starts_with('-') && a.len() > 1 && parse_number(a).is_none());
        Some(Ok(if is_opt { Word::Opt(a, None) } else { Word::Operand(a) }))
    }
}

/// Takes the first of the valued options `names` out of `args`, wherever it
/// is, with its value: `Ok(None)` when there is none, `Err(name)` when it
/// is the last word. Used for the options that belong to `ukvmi` itself
/// rather than to the command (`--vm`, `--map`, `--key-file`, `-o`).
pub(crate) fn take_option(args: &mut Vec<String>, names: &[&str]) -> Result<Option<(String, String)>, String> {
    let Some(i) = args.iter().position(|a| names.contains(&a.as_str())) else { return Ok(None) };
    let name = args.get(i).cloned().unwrap_or_default();
    let Some(value) = args.get(i + 1).cloned() else { return Err(name) };
    args.drain(i..i + 2);
    Ok(Some((name, value)))
}

/// The value of the last valued option `name` among a tool command's words
/// (`--file F` or `--file=F`), the words split as the daemon splits them
/// (`valued`: the options that take a value).
pub(crate) fn last_value(args: &[String], valued: &[&str], name: &str) -> Option<String> {
    Words::new(args, valued, Style::Tool)
        .filter_map(|w| match w {
            Ok(Word::Opt(k, Some(v))) if k == name => Some(v.to_string()),
            _ => None,
        })
        .last()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(args: &[&str], valued: &[&str], style: Style) -> Vec<Result<(String, Option<String>), String>> {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        Words::new(&args, valued, style)
            .map(|w| match w {
                Ok(Word::Opt(k, v)) => Ok((k.to_string(), v.map(str::to_string))),
                Ok(Word::Operand(o)) => Ok((format!("@{o}"), None)),
                Err(MissingValue(k)) => Err(k.to_string()),
            })
            .collect()
    }

    #[test]
    fn tool_words_split_options_values_and_operands() {
        let got =
            words(&["0x10", "--count", "3", "--json", "--via=map", "-", "-x", "LSTAR"], &["--count"], Style::Tool);
        let want: Vec<Result<(String, Option<String>), String>> = vec![
            Ok(("@0x10".into(), None)),
            Ok(("--count".into(), Some("3".into()))),
            Ok(("--json".into(), None)),
            Ok(("--via".into(), Some("map".into()))),
            Ok(("@-".into(), None)),
            Ok(("-x".into(), None)),
            Ok(("@LSTAR".into(), None)),
        ];
        assert_eq!(got, want);
        assert_eq!(words(&["--count"], &["--count"], Style::Tool), vec![Err("--count".to_string())]);
    }

    #[test]
    fn option_words_never_split_on_equals() {
        let got = words(&["--vcpus=2", "--vcpus", "2", "x"], &["--vcpus"], Style::Options);
        assert_eq!(
            got,
            vec![Ok(("--vcpus=2".into(), None)), Ok(("--vcpus".into(), Some("2".into()))), Ok(("x".into(), None))]
        );
    }

    #[test]
    fn last_value_finds_either_spelling_and_the_last_wins() {
        let args: Vec<String> =
            ["write", "0x10", "--file", "a", "--json", "--file=b"].iter().map(|s| s.to_string()).collect();
        assert_eq!(last_value(&args, &["--file"], "--file"), Some("b".to_string()));
        assert_eq!(last_value(&args[..4], &["--file"], "--file"), Some("a".to_string()));
        assert_eq!(last_value(&args[..3], &["--file"], "--file"), None, "no value: none");
        // A word that is another option's value is no `--file`.
        let v: Vec<String> = ["--vcpu", "--file"].iter().map(|s| s.to_string()).collect();
        assert_eq!(last_value(&v, &["--vcpu", "--file"], "--file"), None);
    }

    #[test]
    fn take_option_takes_the_first_with_its_value() {
        let mut args: Vec<String> = ["regs", "--vm", "a", "0", "--vm", "b"].iter().map(|s| s.to_string()).collect();
        assert_eq!(take_option(&mut args, &["--vm"]), Ok(Some(("--vm".into(), "a".into()))));
        assert_eq!(take_option(&mut args, &["--vm"]), Ok(Some(("--vm".into(), "b".into()))));
        assert_eq!(take_option(&mut args, &["--vm"]), Ok(None));
        assert_eq!(args, vec!["regs".to_string(), "0".to_string()]);
        let mut cut: Vec<String> = vec!["dump".into(), "-o".into()];
        assert_eq!(take_option(&mut cut, &["-o", "--output"]), Err("-o".to_string()));
    }
}
