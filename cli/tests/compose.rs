//! Checks the deployment files without Docker (issue 6).
//!
//! compose.yaml, with `.env.example`'s values substituted, must match the Compose
//! Specification's JSON schema (`deploy/compose-spec.json`, see `deploy/README.md`), and every
//! `deepmad` command in it must pass `--check-config` run with exactly that service's
//! environment. Compose's substitution is reimplemented here for the forms the file may use:
//! `${VAR}`, `${VAR:-default}`, `${VAR:?message}` and `$$`; any other `$` fails the test, so
//! the file cannot drift into syntax this check does not understand.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

type Vars = BTreeMap<String, String>;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("cli/ is a folder of the workspace")
        .to_path_buf()
}

fn read(relative: &str) -> String {
    let path = repo_root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Parses a Compose `.env` file: `KEY=VALUE` lines, `#` comment lines and blank lines; a value
/// may be in single or double quotes. Anything else is an error rather than a guess.
fn parse_env_file(text: &str) -> Result<Vars, String> {
    let mut vars = Vars::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| format!("line {}: expected KEY=VALUE", number + 1))?;
        let quoted = value.len() >= 2
            && (value.starts_with('"') && value.ends_with('"')
                || value.starts_with('\'') && value.ends_with('\''));
        let value = match quoted {
            true => &value[1..value.len() - 1],
            false if value.contains(char::is_whitespace) => {
                return Err(format!("line {}: quote a value with spaces", number + 1))
            }
            false => value,
        };
        if vars.insert(key.to_string(), value.to_string()).is_some() {
            return Err(format!("line {}: {key} is set twice", number + 1));
        }
    }
    Ok(vars)
}

/// Substitutes variables in `text` as Compose does, recording each name met in `used`.
fn interpolate(text: &str, vars: &Vars, used: &mut BTreeSet<String>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(dollar) = rest.find('$') {
        out.push_str(&rest[..dollar]);
        let after = &rest[dollar + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
            continue;
        }
        let braced = after
            .strip_prefix('{')
            .ok_or_else(|| format!("{text:?}: write ${{VAR}} (or $$ for a literal $)"))?;
        let close = braced
            .find('}')
            .ok_or_else(|| format!("{text:?}: unclosed ${{"))?;
        out.push_str(&expand(&braced[..close], vars, used)?);
        rest = &braced[close + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Expands the inside of one `${...}`.
fn expand(expression: &str, vars: &Vars, used: &mut BTreeSet<String>) -> Result<String, String> {
    let name_end = expression
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(expression.len());
    let (name, modifier) = expression.split_at(name_end);
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(format!("${{{expression}}}: not a variable name"));
    }
    if modifier.contains('$') {
        return Err(format!(
            "${{{expression}}}: nested substitution is not supported"
        ));
    }
    used.insert(name.to_string());
    let value = vars.get(name).filter(|value| !value.is_empty());
    if modifier.is_empty() {
        // Compose substitutes an empty string for an unset variable (with a warning).
        return Ok(value.cloned().unwrap_or_default());
    }
    if let Some(default) = modifier.strip_prefix(":-") {
        return Ok(value.map_or_else(|| default.to_string(), Clone::clone));
    }
    if let Some(message) = modifier.strip_prefix(":?") {
        return value
            .cloned()
            .ok_or_else(|| format!("required variable {name} is missing a value: {message}"));
    }
    Err(format!("${{{expression}}}: only :- and :? are supported"))
}

/// Substitutes variables in every string value of `tree` (not in keys, as Compose does).
fn interpolate_tree(
    tree: &mut Value,
    vars: &Vars,
    used: &mut BTreeSet<String>,
) -> Result<(), String> {
    match tree {
        Value::String(text) => *text = interpolate(text, vars, used)?,
        Value::Array(items) => {
            for item in items {
                interpolate_tree(item, vars, used)?;
            }
        }
        Value::Object(map) => {
            for value in map.values_mut() {
                interpolate_tree(value, vars, used)?;
            }
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
    Ok(())
}

/// Parses a compose file (YAML merge keys applied) and substitutes `vars`; also returns the
/// names of the variables the file uses.
fn load_compose(text: &str, vars: &Vars) -> Result<(Value, BTreeSet<String>), String> {
    let mut yaml: serde_norway::Value = serde_norway::from_str(text).map_err(|e| e.to_string())?;
    yaml.apply_merge().map_err(|e| e.to_string())?;
    let mut tree = serde_json::to_value(&yaml).map_err(|e| e.to_string())?;
    let mut used = BTreeSet::new();
    interpolate_tree(&mut tree, vars, &mut used)?;
    Ok((tree, used))
}

fn env_example() -> Vars {
    parse_env_file(&read(".env.example")).expect(".env.example is a valid env file")
}

/// compose.yaml with `.env.example`'s values.
fn compose() -> Value {
    load_compose(&read("compose.yaml"), &env_example())
        .expect("compose.yaml parses and substitutes")
        .0
}

/// Returns the schema's complaints about `compose`, one line each.
fn schema_errors(compose: &Value) -> Vec<String> {
    let schema: Value =
        serde_json::from_str(&read("deploy/compose-spec.json")).expect("the schema is JSON");
    // Without jsonschema's resolve-* features nothing can be fetched: the schema's refs are
    // all internal (#/definitions/...), so it must compile from this one file.
    let validator = jsonschema::validator_for(&schema).expect("the Compose schema compiles");
    validator
        .iter_errors(compose)
        .map(|error| format!("{}: {error}", error.instance_path()))
        .collect()
}

/// A service whose container runs the `deepmad` binary.
#[derive(Debug)]
struct DeepmadService {
    name: String,
    /// The arguments after `deepmad`.
    args: Vec<String>,
    environment: Vars,
}

impl DeepmadService {
    fn subcommand(&self) -> &str {
        self.args.first().map_or("", String::as_str)
    }

    /// The value given to `--device`, if any.
    fn device(&self) -> Option<&str> {
        let position = self.args.iter().position(|arg| arg == "--device")?;
        self.args.get(position + 1).map(String::as_str)
    }
}

fn services(compose: &Value) -> &serde_json::Map<String, Value> {
    compose["services"]
        .as_object()
        .expect("compose.yaml has services")
}

/// Returns the services that run `deepmad`; every service built from this repository (image
/// `deepmad:*`) must be one of them, so none escapes the check.
fn deepmad_services(compose: &Value) -> Vec<DeepmadService> {
    let mut found = Vec::new();
    for (name, service) in services(compose) {
        let command = command_of(name, service);
        let ours = service["image"]
            .as_str()
            .is_some_and(|image| image.starts_with("deepmad:"));
        if command.first().map(String::as_str) != Some("deepmad") {
            assert!(!ours, "{name}: an image of ours must run `deepmad ...`");
            continue;
        }
        assert!(
            service.get("env_file").is_none(),
            "{name}: env_file would add variables this check does not see"
        );
        found.push(DeepmadService {
            name: name.clone(),
            args: command[1..].to_vec(),
            environment: environment_of(name, service),
        });
    }
    found
}

fn command_of(name: &str, service: &Value) -> Vec<String> {
    match &service["command"] {
        Value::Null => Vec::new(),
        Value::Array(items) => items
            .iter()
            .map(|item| match item {
                Value::String(text) => text.clone(),
                other => panic!("{name}: command item {other} is not a string"),
            })
            .collect(),
        other => panic!("{name}: write the command as a list, not {other}"),
    }
}

/// The service's `environment`, as a map or as a list of `KEY=VALUE`.
fn environment_of(name: &str, service: &Value) -> Vars {
    let entry = |key: &str, value: &Value| match value {
        Value::String(text) => (key.to_string(), text.clone()),
        Value::Number(number) => (key.to_string(), number.to_string()),
        Value::Bool(flag) => (key.to_string(), flag.to_string()),
        // A bare key takes the value from the shell running compose: not reproducible.
        other => panic!("{name}: environment {key} has no value ({other})"),
    };
    match &service["environment"] {
        Value::Null => Vars::new(),
        Value::Object(map) => map.iter().map(|(key, value)| entry(key, value)).collect(),
        Value::Array(items) => items
            .iter()
            .map(|item| {
                let text = item.as_str().expect("environment items are strings");
                let (key, value) = text
                    .split_once('=')
                    .unwrap_or_else(|| panic!("{name}: environment {text:?} has no value"));
                (key.to_string(), value.to_string())
            })
            .collect(),
        other => panic!("{name}: environment is {other}"),
    }
}

/// Runs `deepmad ARGS --check-config` with only the service's environment (plus PATH).
fn check_config(service: &DeepmadService) -> Output {
    Command::new(env!("CARGO_BIN_EXE_deepmad"))
        .args(&service.args)
        .arg("--check-config")
        .env_clear()
        .envs(&service.environment)
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .current_dir(std::env::temp_dir())
        .output()
        .expect("the deepmad binary runs")
}

fn describe(output: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn find<'a>(services: &'a [DeepmadService], subcommand: &str) -> &'a DeepmadService {
    services
        .iter()
        .find(|service| service.subcommand() == subcommand)
        .unwrap_or_else(|| panic!("no service runs `deepmad {subcommand}`"))
}

#[test]
fn interpolation_handles_defaults_required_values_and_escapes() {
    let vars = Vars::from([
        ("SET".to_string(), "x".to_string()),
        ("EMPTY".into(), "".into()),
    ]);
    let mut used = BTreeSet::new();
    let mut run = |text: &str| interpolate(text, &vars, &mut used);
    assert_eq!(run("a${SET}b").unwrap(), "axb");
    assert_eq!(run("${UNSET}").unwrap(), "");
    assert_eq!(run("${UNSET:-d:1}").unwrap(), "d:1");
    assert_eq!(run("${EMPTY:-d}").unwrap(), "d");
    assert_eq!(run("${SET:?gone}").unwrap(), "x");
    assert_eq!(run("$$HOME").unwrap(), "$HOME");
    assert!(run("${EMPTY:?set EMPTY}")
        .unwrap_err()
        .contains("set EMPTY"));
    assert!(run("$SET").is_err(), "unbraced variables are not supported");
    assert!(run("${SET-d}").is_err(), "only :- and :? are supported");
    // The first `}` closes the expression, so this is `A:-${SET`: refused before A is used.
    assert!(run("${A:-${SET}}").is_err(), "no nested substitution");
    assert!(run("${SET").is_err());
    assert_eq!(
        used,
        BTreeSet::from(["SET".to_string(), "UNSET".into(), "EMPTY".into()])
    );
}

#[test]
fn compose_file_matches_the_compose_specification() {
    let compose = compose();
    assert!(services(&compose).contains_key("coordinator"));
    let errors = schema_errors(&compose);
    assert!(errors.is_empty(), "compose.yaml:\n{}", errors.join("\n"));
}

#[test]
fn schema_rejects_a_broken_compose_file() {
    let mut unknown_key = compose();
    unknown_key["services"]["coordinator"]["restart_policy"] = Value::from("always");
    let errors = schema_errors(&unknown_key);
    assert!(
        errors.iter().any(|error| error.contains("restart_policy")),
        "an unknown service key must fail: {errors:?}"
    );

    let mut no_capabilities = compose();
    let gpu = &mut no_capabilities["services"]["worker-gpu0"]["deploy"]["resources"]
        ["reservations"]["devices"][0];
    gpu.as_object_mut()
        .expect("worker-gpu0 reserves a device")
        .remove("capabilities");
    assert!(
        !schema_errors(&no_capabilities).is_empty(),
        "a device reservation without capabilities must fail"
    );
}

#[test]
fn env_example_sets_exactly_the_variables_compose_uses() {
    let vars = env_example();
    let (_, used) = load_compose(&read("compose.yaml"), &vars).expect("compose.yaml loads");
    let defined: BTreeSet<String> = vars.keys().cloned().collect();
    let missing: Vec<_> = used.difference(&defined).collect();
    let unused: Vec<_> = defined.difference(&used).collect();
    assert!(
        missing.is_empty(),
        "used but not in .env.example: {missing:?}"
    );
    assert!(unused.is_empty(), "in .env.example but unused: {unused:?}");
    for (key, value) in &vars {
        if key.contains("TOKEN") || key.contains("PASSWORD") {
            assert!(
                value.starts_with("change-me"),
                "{key}: mark the sample \"change me\""
            );
        }
    }
}

#[test]
fn a_required_variable_left_empty_stops_compose() {
    let mut vars = env_example();
    vars.insert("WORKER_TOKEN".into(), String::new());
    let error = load_compose(&read("compose.yaml"), &vars).unwrap_err();
    assert!(error.contains("WORKER_TOKEN"), "{error}");
}

#[test]
fn every_deepmad_service_passes_check_config() {
    let services = deepmad_services(&compose());
    assert_eq!(find(&services, "coordinator").name, "coordinator");
    assert!(services
        .iter()
        .any(|service| service.subcommand() == "worker"));
    for service in &services {
        let output = check_config(service);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && stdout.starts_with("settings ok"),
            "{}: deepmad {:?} --check-config\n{}",
            service.name,
            service.args,
            describe(&output)
        );
        match (service.subcommand(), service.device()) {
            ("coordinator", _) => assert!(stdout.contains("\nauth on"), "{stdout}"),
            ("worker", Some(device)) => {
                assert!(stdout.contains(&format!("\ndevice {device}")), "{stdout}")
            }
            (other, device) => panic!("{}: unexpected {other} {device:?}", service.name),
        }
    }
}

#[test]
fn check_config_fails_on_bad_values_from_the_env_file() {
    let cases = [
        (
            "coordinator",
            "CLIENT_TOKENS",
            "too-short",
            "auth.client_tokens",
        ),
        ("coordinator", "LEASE_MS", "15000", "lease.lease_ms"),
        (
            "worker",
            "COORDINATOR_URL",
            "ftp://head-node:50051",
            "coordinator",
        ),
    ];
    for (subcommand, key, value, named) in cases {
        let mut vars = env_example();
        vars.insert(key.into(), value.into());
        let (compose, _) = load_compose(&read("compose.yaml"), &vars).expect("compose loads");
        let services = deepmad_services(&compose);
        let output = check_config(find(&services, subcommand));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{key}={value}: {}",
            describe(&output)
        );
        assert!(
            stderr.contains(named),
            "{key}={value}: expected {named:?} in {stderr}"
        );
    }
}

#[test]
fn workers_send_a_worker_token_the_coordinator_accepts() {
    let services = deepmad_services(&compose());
    let coordinator = &find(&services, "coordinator").environment;
    let tokens = |key: &str| -> Vec<String> {
        coordinator[key]
            .split(',')
            .map(|t| t.trim().to_string())
            .collect()
    };
    let (worker_tokens, client_tokens) = (
        tokens("DEEPMAD__AUTH__WORKER_TOKENS"),
        tokens("DEEPMAD__AUTH__CLIENT_TOKENS"),
    );
    for worker in services.iter().filter(|s| s.subcommand() == "worker") {
        let token = &worker.environment["DEEPMAD_TOKEN"];
        assert!(
            worker_tokens.contains(token),
            "{}: not a worker token",
            worker.name
        );
        assert!(
            !client_tokens.contains(token),
            "{}: a client token",
            worker.name
        );
        assert_eq!(
            worker.environment["DEEPMAD_COORDINATOR"],
            "http://coordinator:50051"
        );
    }
}

#[test]
fn each_gpu_worker_pins_one_gpu_seen_as_cuda_0_with_its_own_work_volume() {
    let compose = compose();
    let mut gpus = BTreeSet::new();
    let mut volumes = BTreeSet::new();
    let mut gpu_workers = 0;
    for service in deepmad_services(&compose) {
        let raw = &services(&compose)[&service.name];
        let devices = &raw["deploy"]["resources"]["reservations"]["devices"];
        let work_volume = raw["volumes"]
            .as_array()
            .and_then(|mounts| {
                mounts
                    .iter()
                    .filter_map(Value::as_str)
                    .find(|m| m.ends_with(":/var/lib/deepmad/work"))
            })
            .map(str::to_string);
        if service.subcommand() == "worker" {
            let volume = work_volume.unwrap_or_else(|| panic!("{}: no work volume", service.name));
            assert!(
                volumes.insert(volume),
                "{}: work volume shared",
                service.name
            );
        }
        if devices.is_null() {
            assert_ne!(
                service.device(),
                Some("cuda:0"),
                "{}: no GPU reserved",
                service.name
            );
            continue;
        }
        let ids = devices[0]["device_ids"]
            .as_array()
            .expect("device_ids listed");
        assert_eq!(ids.len(), 1, "{}: one GPU per worker", service.name);
        assert!(
            gpus.insert(ids[0].to_string()),
            "{}: GPU taken twice",
            service.name
        );
        assert_eq!(
            service.device(),
            Some("cuda:0"),
            "{}: the only GPU visible",
            service.name
        );
        gpu_workers += 1;
    }
    assert!(gpu_workers >= 2, "the sample node has two GPUs");
}

#[test]
fn dockerfile_defines_the_targets_compose_builds() {
    let dockerfile = read("Dockerfile");
    let stages: BTreeSet<&str> = dockerfile
        .lines()
        .filter(|line| line.starts_with("FROM "))
        .filter_map(|line| line.split_whitespace().nth(3))
        .collect();
    let compose = compose();
    for (name, service) in services(&compose) {
        if let Some(target) = service["build"]["target"].as_str() {
            assert!(
                stages.contains(target),
                "{name}: no stage {target} in {stages:?}"
            );
        }
    }
    assert!(
        dockerfile.contains("--features cuda"),
        "the cuda stage builds the cuda feature"
    );
}
