//! runc's command line, as containerd's shim (go-runc) writes it, parsed into
//! what the adapter needs and translated into runsc's spelling.
//!
//! go-runc emits `runc [global flags] <command> [flags] <id> [args]`, each
//! flag either `--name value` or `--name=value`; urfave/cli (runc's parser)
//! also accepts a single dash. Flags runsc spells the same are passed
//! through, flags runsc lacks and that change nothing for it are dropped,
//! and flags the adapter cannot honour are errors.

use crate::error::AdapterError;

/// Global flags, in runsc's spelling.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Globals {
    /// `--root`: runsc's state directory for this namespace.
    pub root: Option<String>,
    /// `--log`: the JSON log containerd's shim reads the last error from.
    pub log: Option<String>,
    /// Flags passed to runsc before the command.
    pub runsc_flags: Vec<String>,
}

/// One invocation: the global flags and the command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    pub globals: Globals,
    pub command: Command,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Create {
        id: String,
        bundle: String,
        pid_file: Option<String>,
        console_socket: Option<String>,
    },
    Start {
        id: String,
    },
    Kill {
        id: String,
        /// runsc's `kill` arguments after the command name, id and signal included.
        args: Vec<String>,
    },
    Delete {
        id: String,
        args: Vec<String>,
    },
    /// `exec`: the adapter joins the container's cgroup first.
    Exec {
        id: String,
        args: Vec<String>,
    },
    /// Everything else goes to runsc unchanged (after flag translation).
    Passthrough {
        name: String,
        args: Vec<String>,
    },
}

impl Command {
    /// The container id this command is about, if any.
    pub fn id(&self) -> Option<&str> {
        match self {
            Command::Create { id, .. }
            | Command::Start { id }
            | Command::Kill { id, .. }
            | Command::Delete { id, .. }
            | Command::Exec { id, .. } => Some(id),
            Command::Passthrough { .. } => None,
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Command::Create { .. } => "create",
            Command::Start { .. } => "start",
            Command::Kill { .. } => "kill",
            Command::Delete { .. } => "delete",
            Command::Exec { .. } => "exec",
            Command::Passthrough { name, .. } => name,
        }
    }
}

/// What to do with one flag.
#[derive(Debug, Clone, Copy)]
enum Rule {
    /// Pass it through under this name, with its value if it takes one.
    Keep(&'static str),
    /// runsc does not have it and it makes no difference there.
    Drop,
    /// Only the given value may be dropped; any other is unsupported.
    DropIfValue(&'static str),
}

#[derive(Debug, Clone, Copy)]
struct FlagSpec {
    names: &'static [&'static str],
    takes_value: bool,
    rule: Rule,
}

const fn flag(names: &'static [&'static str], takes_value: bool, rule: Rule) -> FlagSpec {
    FlagSpec {
        names,
        takes_value,
        rule,
    }
}

const GLOBAL_FLAGS: &[FlagSpec] = &[
    flag(&["root"], true, Rule::Keep("root")),
    flag(&["log"], true, Rule::Keep("log")),
    flag(&["log-format"], true, Rule::Keep("log-format")),
    flag(&["debug"], false, Rule::Keep("debug")),
    flag(&["systemd-cgroup"], false, Rule::Keep("systemd-cgroup")),
    // go-runc writes `--rootless=false`; runsc's --rootless is a plain bool.
    flag(&["rootless"], true, Rule::DropIfValue("false")),
    flag(&["criu"], true, Rule::Drop),
];

const CREATE_FLAGS: &[FlagSpec] = &[
    flag(&["bundle", "b"], true, Rule::Keep("bundle")),
    flag(&["pid-file"], true, Rule::Keep("pid-file")),
    flag(&["console-socket"], true, Rule::Keep("console-socket")),
    // runsc always pivots into its own root and has no session keyring.
    flag(&["no-pivot"], false, Rule::Drop),
    flag(&["no-new-keyring"], false, Rule::Drop),
    flag(&["preserve-fds"], true, Rule::DropIfValue("0")),
];

const EXEC_FLAGS: &[FlagSpec] = &[
    flag(&["process", "p"], true, Rule::Keep("process")),
    flag(&["console-socket"], true, Rule::Keep("console-socket")),
    flag(&["detach", "d"], false, Rule::Keep("detach")),
    flag(&["pid-file"], true, Rule::Keep("pid-file")),
    flag(&["cwd"], true, Rule::Keep("cwd")),
    flag(&["env", "e"], true, Rule::Keep("env")),
    flag(&["user", "u"], true, Rule::Keep("user")),
    flag(&["cap", "c"], true, Rule::Keep("cap")),
    flag(&["preserve-fds"], true, Rule::DropIfValue("0")),
    flag(&["no-new-privs"], false, Rule::Drop),
];

const KILL_FLAGS: &[FlagSpec] = &[flag(&["all", "a"], false, Rule::Keep("all"))];
const DELETE_FLAGS: &[FlagSpec] = &[flag(&["force", "f"], false, Rule::Keep("force"))];
const PS_FLAGS: &[FlagSpec] = &[flag(&["format", "f"], true, Rule::Keep("format"))];

/// Splits `-x`, `--x` and `--x=v` into (name, inline value); `None` for a
/// positional argument.
fn split_flag(arg: &str) -> Option<(&str, Option<&str>)> {
    let body = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-'))?;
    if body.is_empty() {
        return None;
    }
    Some(match body.split_once('=') {
        Some((name, value)) => (name, Some(value)),
        None => (body, None),
    })
}

/// Flags and positional arguments of one command line segment.
#[derive(Debug, Default)]
struct Parsed {
    /// (canonical runsc name, value) of kept flags, in order.
    kept: Vec<(&'static str, Option<String>)>,
    positional: Vec<String>,
}

impl Parsed {
    fn value(&self, name: &str) -> Option<&str> {
        self.kept
            .iter()
            .rev()
            .find(|(n, _)| *n == name)
            .and_then(|(_, v)| v.as_deref())
    }

    fn to_args(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (name, value) in &self.kept {
            match value {
                Some(v) => out.push(format!("--{name}={v}")),
                None => out.push(format!("--{name}")),
            }
        }
        out
    }
}

/// Parses flags until the first positional argument when `stop_at_positional`
/// (global flags end at the command name), else to the end (urfave/cli
/// stops at the first positional too, but go-runc never puts flags after
/// the id). Returns the parse and the number of arguments consumed.
fn parse_flags(
    args: &[String],
    specs: &[FlagSpec],
    context: &str,
    stop_at_positional: bool,
) -> Result<(Parsed, usize), AdapterError> {
    let mut parsed = Parsed::default();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        if arg == "--" {
            parsed.positional.extend(args[i + 1..].iter().cloned());
            return Ok((parsed, args.len()));
        }
        let Some((name, inline)) = split_flag(arg) else {
            if stop_at_positional {
                return Ok((parsed, i));
            }
            parsed.positional.push(arg.clone());
            i += 1;
            continue;
        };
        let spec = specs
            .iter()
            .find(|s| s.names.contains(&name))
            .ok_or_else(|| AdapterError::UnknownFlag {
                context: context.to_owned(),
                flag: arg.clone(),
            })?;
        let value = if spec.takes_value {
            match inline {
                Some(v) => Some(v.to_owned()),
                None => {
                    i += 1;
                    Some(
                        args.get(i)
                            .cloned()
                            .ok_or_else(|| AdapterError::MissingValue {
                                context: context.to_owned(),
                                flag: arg.clone(),
                            })?,
                    )
                }
            }
        } else {
            // A boolean flag may still be written `--flag=true`.
            match inline {
                None | Some("true") => None,
                Some("false") => {
                    i += 1;
                    continue;
                }
                Some(_) => {
                    return Err(AdapterError::UnsupportedFlag {
                        context: context.to_owned(),
                        flag: arg.clone(),
                    })
                }
            }
        };
        apply_rule(&mut parsed, spec, value).map_err(|()| AdapterError::UnsupportedFlag {
            context: context.to_owned(),
            flag: arg.clone(),
        })?;
        i += 1;
    }
    Ok((parsed, i))
}

/// What `spec`'s rule does with a flag given `value`; `Err` when the value
/// is one the adapter cannot honour.
fn apply_rule(parsed: &mut Parsed, spec: &FlagSpec, value: Option<String>) -> Result<(), ()> {
    match spec.rule {
        Rule::Keep(runsc_name) => parsed.kept.push((runsc_name, value)),
        Rule::Drop => {}
        Rule::DropIfValue(allowed) if value.as_deref() != Some(allowed) => {
            // `--rootless=true` is the one value worth honouring.
            if spec.names.contains(&"rootless") && value.as_deref() == Some("true") {
                parsed.kept.push(("rootless", None));
            } else {
                return Err(());
            }
        }
        Rule::DropIfValue(_) => {}
    }
    Ok(())
}

fn one_id(command: &str, positional: &[String]) -> Result<String, AdapterError> {
    match positional {
        [id] if !id.is_empty() => Ok(id.clone()),
        _ => Err(AdapterError::Usage(format!(
            "{command}: expected exactly one container id, got {positional:?}"
        ))),
    }
}

/// Parses runc's command line (without the program name).
pub fn parse(args: &[String]) -> Result<Invocation, AdapterError> {
    let (global, used) = parse_flags(args, GLOBAL_FLAGS, "global", true)?;
    let Some(name) = args.get(used) else {
        return Err(AdapterError::Usage("no command given".into()));
    };
    let rest = &args[used + 1..];
    let globals = Globals {
        root: global.value("root").map(str::to_owned),
        log: global.value("log").map(str::to_owned),
        runsc_flags: global.to_args(),
    };
    let command = match name.as_str() {
        "create" => {
            let (p, _) = parse_flags(rest, CREATE_FLAGS, "create", false)?;
            let id = one_id("create", &p.positional)?;
            Command::Create {
                bundle: p.value("bundle").unwrap_or(".").to_owned(),
                pid_file: p.value("pid-file").map(str::to_owned),
                console_socket: p.value("console-socket").map(str::to_owned),
                id,
            }
        }
        "start" => {
            let (p, _) = parse_flags(rest, &[], "start", false)?;
            Command::Start {
                id: one_id("start", &p.positional)?,
            }
        }
        "kill" => {
            let (p, _) = parse_flags(rest, KILL_FLAGS, "kill", false)?;
            let (id, signal) = match p.positional.as_slice() {
                [id] => (id.clone(), "TERM".to_owned()),
                [id, signal] => (id.clone(), signal.clone()),
                other => {
                    return Err(AdapterError::Usage(format!(
                        "kill: expected <id> [signal], got {other:?}"
                    )))
                }
            };
            let mut args = p.to_args();
            args.extend([id.clone(), signal]);
            Command::Kill { id, args }
        }
        "delete" => {
            let (p, _) = parse_flags(rest, DELETE_FLAGS, "delete", false)?;
            let id = one_id("delete", &p.positional)?;
            let mut args = p.to_args();
            args.push(id.clone());
            Command::Delete { id, args }
        }
        "exec" => {
            let (p, _) = parse_flags(rest, EXEC_FLAGS, "exec", false)?;
            let Some(id) = p.positional.first().cloned() else {
                return Err(AdapterError::Usage("exec: no container id".into()));
            };
            let mut args = p.to_args();
            args.extend(p.positional.iter().cloned());
            Command::Exec { id, args }
        }
        "ps" => {
            let (p, _) = parse_flags(rest, PS_FLAGS, "ps", false)?;
            let mut args = p.to_args();
            args.extend(p.positional.iter().cloned());
            Command::Passthrough {
                name: "ps".into(),
                args,
            }
        }
        // Commands runsc spells like runc and whose flags go-runc does not
        // use (state, pause, resume, events, list, spec, ...).
        other => Command::Passthrough {
            name: other.to_owned(),
            args: rest.to_vec(),
        },
    };
    Ok(Invocation { globals, command })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| (*s).to_owned()).collect()
    }

    /// What containerd 1.6's shim runs for a container's create.
    #[test]
    fn go_runc_create_is_translated() {
        let inv = parse(&v(&[
            "--root",
            "/run/r/k8s.io",
            "--log",
            "/b/log.json",
            "--log-format",
            "json",
            "create",
            "--bundle",
            "/b",
            "--pid-file",
            "/b/init.pid",
            "--no-pivot",
            "--no-new-keyring",
            "abc",
        ]))
        .unwrap();
        assert_eq!(inv.globals.root.as_deref(), Some("/run/r/k8s.io"));
        assert_eq!(inv.globals.log.as_deref(), Some("/b/log.json"));
        assert_eq!(
            inv.globals.runsc_flags,
            v(&[
                "--root=/run/r/k8s.io",
                "--log=/b/log.json",
                "--log-format=json"
            ])
        );
        assert_eq!(
            inv.command,
            Command::Create {
                id: "abc".into(),
                bundle: "/b".into(),
                pid_file: Some("/b/init.pid".into()),
                console_socket: None,
            }
        );
    }

    #[test]
    fn inline_values_single_dashes_and_bool_values() {
        let inv = parse(&v(&[
            "-root=/r",
            "--systemd-cgroup",
            "--rootless=false",
            "create",
            "-b=/b",
            "--console-socket=/s.sock",
            "--preserve-fds",
            "0",
            "id1",
        ]))
        .unwrap();
        assert_eq!(
            inv.globals.runsc_flags,
            v(&["--root=/r", "--systemd-cgroup"])
        );
        let Command::Create {
            bundle,
            console_socket,
            ..
        } = inv.command
        else {
            panic!("not a create: {:?}", inv.command)
        };
        assert_eq!(bundle, "/b");
        assert_eq!(console_socket.as_deref(), Some("/s.sock"));
    }

    #[test]
    fn rootless_true_is_kept_as_runsc_bool() {
        let inv = parse(&v(&["--rootless=true", "state", "x"])).unwrap();
        assert_eq!(inv.globals.runsc_flags, v(&["--rootless"]));
    }

    #[test]
    fn kill_keeps_all_and_defaults_the_signal() {
        let inv = parse(&v(&["kill", "--all", "c1", "9"])).unwrap();
        assert_eq!(
            inv.command,
            Command::Kill {
                id: "c1".into(),
                args: v(&["--all", "c1", "9"])
            }
        );
        let inv = parse(&v(&["kill", "c1"])).unwrap();
        assert_eq!(
            inv.command,
            Command::Kill {
                id: "c1".into(),
                args: v(&["c1", "TERM"])
            }
        );
    }

    #[test]
    fn exec_flags_pass_through() {
        let inv = parse(&v(&[
            "--root",
            "/r",
            "exec",
            "--process",
            "/tmp/p.json",
            "--detach",
            "--pid-file",
            "/b/e.pid",
            "c1",
        ]))
        .unwrap();
        assert_eq!(
            inv.command,
            Command::Exec {
                id: "c1".into(),
                args: v(&[
                    "--process=/tmp/p.json",
                    "--detach",
                    "--pid-file=/b/e.pid",
                    "c1"
                ])
            }
        );
    }

    #[test]
    fn delete_force() {
        let inv = parse(&v(&["delete", "--force", "c1"])).unwrap();
        assert_eq!(
            inv.command,
            Command::Delete {
                id: "c1".into(),
                args: v(&["--force", "c1"])
            }
        );
    }

    #[test]
    fn unknown_and_unsupported_flags_are_errors() {
        assert!(matches!(
            parse(&v(&["--bogus", "state", "x"])),
            Err(AdapterError::UnknownFlag { .. })
        ));
        assert!(matches!(
            parse(&v(&["create", "--preserve-fds", "2", "x"])),
            Err(AdapterError::UnsupportedFlag { .. })
        ));
        assert!(matches!(
            parse(&v(&["create", "--bundle"])),
            Err(AdapterError::MissingValue { .. })
        ));
        assert!(matches!(
            parse(&v(&["--root", "/r"])),
            Err(AdapterError::Usage(_))
        ));
        assert!(matches!(
            parse(&v(&["start", "a", "b"])),
            Err(AdapterError::Usage(_))
        ));
    }

    #[test]
    fn other_commands_pass_through_verbatim() {
        let inv = parse(&v(&["--root", "/r", "state", "c1"])).unwrap();
        assert_eq!(
            inv.command,
            Command::Passthrough {
                name: "state".into(),
                args: v(&["c1"])
            }
        );
        let inv = parse(&v(&["ps", "--format", "json", "c1"])).unwrap();
        assert_eq!(
            inv.command,
            Command::Passthrough {
                name: "ps".into(),
                args: v(&["--format=json", "c1"])
            }
        );
    }
}
