//! Where a configuration comes from: the YAML file with `${VAR}` interpolation, then
//! `PRESENCE_<SECTION>__<KEY>` overrides from the environment, merged into one tree that
//! [`super::Config::load`] reads. Also how a value written as text (an environment
//! variable) is read where a list or a string is expected.

use std::collections::HashMap;
use std::path::Path;

use serde::de::{self, Deserializer};
use serde::Deserialize;
use serde_yaml::Value;

use super::ConfigError;

const ENV_PREFIX: &str = "PRESENCE_";

/// The file (if any, interpolated from `env`) with `env`'s overrides applied.
pub(super) fn tree(file: Option<&Path>, env: HashMap<String, String>) -> Result<Value, ConfigError> {
    let mut tree = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
            let mut v: Value = serde_yaml::from_str(&text).map_err(|e| ConfigError::Yaml { path: path.into(), message: e.to_string() })?;
            if v.is_null() {
                v = Value::Mapping(Default::default());
            }
            interpolate(&mut v, &env, "")?;
            v
        }
        None => Value::Mapping(Default::default()),
    };
    apply_env_overrides(&mut tree, &env)?;
    Ok(tree)
}

pub(super) fn display_path(p: &str) -> String {
    if p == "." || p.is_empty() {
        "(top level)".into()
    } else {
        p.to_string()
    }
}

/// Replaces `${VAR}` and `${VAR:-default}` in every string of the tree. A scalar that is
/// exactly one reference is re-read as YAML, so `port: ${PORT}` yields a number.
fn interpolate(v: &mut Value, env: &HashMap<String, String>, path: &str) -> Result<(), ConfigError> {
    match v {
        Value::String(s) if s.contains("${") => {
            let whole = s.starts_with("${") && s.ends_with('}') && s.matches("${").count() == 1;
            let replaced = substitute(s, env).map_err(|reason| ConfigError::Variable { key: display_path(path), reason })?;
            *v = if whole { scalar(&replaced) } else { Value::String(replaced) };
        }
        Value::Mapping(m) => {
            for (k, child) in m.iter_mut() {
                let key = k.as_str().unwrap_or("?");
                let p = if path.is_empty() { key.to_string() } else { format!("{path}.{key}") };
                interpolate(child, env, &p)?;
            }
        }
        Value::Sequence(items) => {
            for (i, child) in items.iter_mut().enumerate() {
                interpolate(child, env, &format!("{path}[{i}]"))?;
            }
        }
        _ => {}
    }
    Ok(())
}

fn substitute(s: &str, env: &HashMap<String, String>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or_else(|| format!("unterminated ${{ in {s:?}"))?;
        let expr = &after[..end];
        let (name, default) = match expr.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (expr, None),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("invalid variable name {name:?} in ${{...}}"));
        }
        match (env.get(name), default) {
            (Some(v), _) => out.push_str(v),
            (None, Some(d)) => out.push_str(d),
            (None, None) => return Err(format!("environment variable {name} is not set (write ${{{name}:-default}} for a fallback)")),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Reads an environment/interpolated value as a YAML scalar (number, bool, string).
fn scalar(s: &str) -> Value {
    match serde_yaml::from_str::<Value>(s) {
        Ok(v @ (Value::Number(_) | Value::Bool(_) | Value::String(_))) => v,
        Ok(Value::Sequence(seq)) if s.trim_start().starts_with('[') => Value::Sequence(seq),
        _ => Value::String(s.to_string()),
    }
}

/// Whether an environment variable is one of ours: `PRESENCE_<SECTION>__<KEY>`. Other
/// `PRESENCE_*` names are not overrides and do not stop the start: `PRESENCE_CONFIG` (the
/// file), and what Kubernetes injects for a Service named `presence` (`PRESENCE_PORT`,
/// `PRESENCE_SERVICE_HOST`, `PRESENCE_PORT_8080_TCP_ADDR`, ...).
pub fn is_override(name: &str) -> bool {
    // `PRESENCE__PORT` (an empty section) is a mistake of ours to report, not theirs.
    name.strip_prefix(ENV_PREFIX).is_some_and(|rest| rest.contains("__") || rest.starts_with('_'))
}

fn apply_env_overrides(tree: &mut Value, env: &HashMap<String, String>) -> Result<(), ConfigError> {
    let mut keys: Vec<&String> = env.keys().filter(|k| is_override(k)).collect();
    keys.sort();
    for key in keys {
        let path: Vec<String> = key[ENV_PREFIX.len()..].split("__").map(|p| p.to_ascii_lowercase()).collect();
        if path.len() < 2 || path.iter().any(|p| p.is_empty() || p.starts_with('_')) {
            return Err(ConfigError::Override {
                var: key.clone(),
                reason: "environment overrides are written PRESENCE_<SECTION>__<KEY> (each part non-empty)".into(),
            });
        }
        let mut node = &mut *tree;
        for (i, part) in path.iter().enumerate() {
            if !node.is_mapping() {
                *node = Value::Mapping(Default::default());
            }
            let Value::Mapping(map) = node else {
                return Err(ConfigError::Override { var: key.clone(), reason: "cannot set a key below a scalar".into() });
            };
            let k = Value::String(part.clone());
            if i + 1 == path.len() {
                map.insert(k, scalar(&env[key]));
                break;
            }
            node = map.entry(k).or_insert_with(|| Value::Mapping(Default::default()));
        }
    }
    Ok(())
}

/// A list of strings: a YAML sequence, or one string of comma-separated items (how a list
/// is written in an environment variable).
pub(super) fn de_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    match Value::deserialize(d)? {
        Value::Sequence(items) => items
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                Value::Number(n) => Ok(n.to_string()),
                _ => Err(de::Error::custom("expected a list of strings")),
            })
            .collect(),
        Value::String(s) => Ok(s.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect()),
        Value::Null => Ok(Vec::new()),
        _ => Err(de::Error::custom("expected a list of strings, or one string of comma-separated items")),
    }
}

/// Accepts a string, or a number/bool written where a string is expected
/// (`jwt_secret: 12345`, `PRESENCE_SERVICE__NODE_ID=7`).
pub(super) fn de_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    match Value::deserialize(d)? {
        Value::String(s) => Ok(s),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        Value::Null => Ok(String::new()),
        _ => Err(de::Error::custom("expected a string")),
    }
}
