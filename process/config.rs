//! The optional TOML config file, below flags and environment variables in precedence.
//!
//! Rather than a second parser beside clap, the file feeds clap's own environment fallback:
//! each key (a long flag name, `data-dir` or `data_dir`) becomes the flag's environment
//! variable, unless that variable is already set. So flags beat the environment, the
//! environment beats the file, every value is validated by clap in one place, and `--help`
//! stays the one list of options.

use clap::CommandFactory;
use std::path::PathBuf;

/// Finds `--config FILE` (or `TWOPC_CONFIG`) and loads it into the environment of this
/// process. Call first thing in `main`, before any thread exists.
pub fn load<A: CommandFactory>() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    let from_flag = args.iter().enumerate().find_map(|(i, a)| {
        a.strip_prefix("--config=").map(str::to_string).or_else(|| {
            (a == "--config")
                .then(|| args.get(i + 1).cloned())
                .flatten()
        })
    });
    let Some(path) = from_flag
        .or_else(|| std::env::var("TWOPC_CONFIG").ok())
        .map(PathBuf::from)
    else {
        return Ok(());
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e| format!("config file {} is not valid TOML: {e}", path.display()))?;
    let command = A::command();
    for (key, value) in table {
        let long = key.replace('_', "-");
        let arg = command
            .get_arguments()
            .find(|a| a.get_long() == Some(long.as_str()) && a.get_env().is_some())
            .ok_or_else(|| {
                let known: Vec<&str> = command
                    .get_arguments()
                    .filter(|a| a.get_env().is_some())
                    .filter_map(|a| a.get_long())
                    .filter(|l| *l != "config")
                    .collect();
                format!(
                    "unknown option {key:?} in {}; known: {}",
                    path.display(),
                    known.join(", ")
                )
            })?;
        let env = arg.get_env().expect("filtered above");
        if std::env::var_os(env).is_some() {
            continue;
        }
        let value = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(_) | toml::Value::Float(_) | toml::Value::Boolean(_) => {
                value.to_string()
            }
            other => {
                return Err(format!(
                    "option {key:?} in {}: expected a string, number or boolean, got {other}",
                    path.display()
                ));
            }
        };
        // SAFETY: called at the start of main, before any other thread exists.
        unsafe { std::env::set_var(env, value) };
    }
    Ok(())
}
