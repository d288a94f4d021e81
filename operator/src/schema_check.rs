//! A structural check of a JSON value against an OpenAPI v3 schema, as the API server does
//! it with strict field validation: types, nullability, required fields, enums, patterns,
//! lengths, ranges and unknown fields. For tests (the scenarios check every status the
//! controller writes against the generated CRD; tests/crd_checks.rs the examples).

use serde_json::Value;

/// Structural validation as the API server does it with strict field validation: types,
/// required fields, enums, patterns, lengths, ranges, no unknown fields.
pub fn check(schema: &Value, v: &Value, path: &str, errs: &mut Vec<String>) {
    if v.is_null() {
        if schema["nullable"] != true {
            errs.push(format!("{path}: null is not allowed"));
        }
        return;
    }
    let ty = schema["type"].as_str().unwrap_or("");
    let ok = match ty {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "boolean" => v.is_boolean(),
        "" => true,
        other => {
            errs.push(format!("{path}: unknown schema type {other}"));
            true
        }
    };
    if !ok {
        errs.push(format!("{path}: expected {ty}, got {v}"));
        return;
    }
    if let Some(e) = schema["enum"].as_array()
        && !e.contains(v)
    {
        errs.push(format!("{path}: {v} is not one of {e:?}"));
    }
    if let Some(s) = v.as_str() {
        if let Some(p) = schema["pattern"].as_str() {
            let re = regex::Regex::new(p).expect("pattern compiles");
            if !re.is_match(s) {
                errs.push(format!("{path}: {s:?} does not match {p}"));
            }
        }
        if schema["format"] == "date-time" && s.parse::<jiff::Timestamp>().is_err() {
            errs.push(format!("{path}: {s:?} is not an RFC 3339 date-time"));
        }
        let n = s.chars().count() as u64;
        if schema["minLength"].as_u64().is_some_and(|m| n < m)
            || schema["maxLength"].as_u64().is_some_and(|m| n > m)
        {
            errs.push(format!("{path}: length {n} out of bounds"));
        }
    }
    if let Some(n) = v.as_f64()
        && (schema["minimum"].as_f64().is_some_and(|m| n < m)
            || schema["maximum"].as_f64().is_some_and(|m| n > m))
    {
        errs.push(format!("{path}: {n} out of range"));
    }
    if let Some(o) = v.as_object() {
        if schema["x-kubernetes-preserve-unknown-fields"] == true {
            return;
        }
        let props = schema["properties"].as_object();
        for req in schema["required"].as_array().into_iter().flatten() {
            let k = req.as_str().expect("name");
            if !o.contains_key(k) {
                errs.push(format!("{path}: missing required field {k}"));
            }
        }
        for (k, val) in o {
            match props.and_then(|p| p.get(k)) {
                Some(s) => check(s, val, &format!("{path}.{k}"), errs),
                None => match schema.get("additionalProperties") {
                    Some(s) if s.is_object() => check(s, val, &format!("{path}.{k}"), errs),
                    _ => errs.push(format!("{path}: unknown field {k:?}")),
                },
            }
        }
    }
    if let Some(a) = v.as_array() {
        for (i, item) in a.iter().enumerate() {
            check(&schema["items"], item, &format!("{path}[{i}]"), errs);
        }
    }
}
