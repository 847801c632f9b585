//! Reading the YAML documents of a commit: strict typed parsing with errors
//! that name the file, the field path and the line, and never echo a value.

use serde::de::DeserializeOwned;

use crate::error::RenderError;

/// The most YAML documents one file may hold.
pub const MAX_DOCUMENTS_PER_FILE: usize = 5_000;

pub fn utf8<'a>(file: &str, bytes: &'a [u8]) -> Result<&'a str, RenderError> {
    std::str::from_utf8(bytes).map_err(|e| {
        RenderError::invalid(
            file,
            None,
            None,
            format!("not UTF-8 text (byte {})", e.valid_up_to()),
        )
    })
}

/// Splits a multi-document YAML file at `---` lines, keeping each
/// document's line offset so errors point at the right line of the file.
/// Flow collections (`[`, `{`) and compact sequences (`- - x`) deeper than
/// this are refused before parsing: a YAML parser spends time quadratic in
/// the depth before its own recursion limit stops it (50 s for 100,000
/// brackets), and no manifest needs more than a few dozen levels.
pub const MAX_NESTING: usize = 64;

/// Refuses `text` if it nests deeper than [`MAX_NESTING`], in one linear
/// pass over its bytes: brackets inside quoted scalars and comments do not
/// count.
pub fn check_nesting(file: &str, text: &str) -> Result<(), RenderError> {
    let too_deep = |line: usize| {
        RenderError::invalid(
            file,
            None,
            Some(line),
            format!("nested more than {MAX_NESTING} levels deep; refused before parsing"),
        )
    };
    let bytes = text.as_bytes();
    let (mut depth, mut line) = (0usize, 1usize);
    let mut quote: Option<u8> = None;
    let mut comment = false;
    // The last byte that was not a space: a quote opens a scalar only
    // after one of these (else it is an apostrophe in a plain scalar).
    let mut last = b'\n';
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'\n' {
            line += 1;
            comment = false;
            last = b'\n';
            // Compact block sequences: "- - - x" nests once per dash.
            let mut j = i + 1;
            while bytes.get(j) == Some(&b' ') {
                j += 1;
            }
            let mut dashes = 0;
            while bytes.get(j) == Some(&b'-') && bytes.get(j + 1) == Some(&b' ') {
                dashes += 1;
                j += 2;
                while bytes.get(j) == Some(&b' ') {
                    j += 1;
                }
            }
            if dashes > MAX_NESTING {
                return Err(too_deep(line));
            }
        } else if comment {
        } else if let Some(q) = quote {
            if q == b'"' && b == b'\\' {
                i += 1;
            } else if b == q {
                if q == b'\'' && bytes.get(i + 1) == Some(&b'\'') {
                    i += 1;
                } else {
                    quote = None;
                    last = b;
                }
            }
        } else {
            match b {
                b'#' if i == 0 || bytes[i - 1].is_ascii_whitespace() => comment = true,
                b'"' | b'\'' if matches!(last, b'\n' | b':' | b'-' | b'[' | b'{' | b',') => {
                    quote = Some(b)
                }
                b'[' | b'{' => {
                    depth += 1;
                    if depth > MAX_NESTING {
                        return Err(too_deep(line));
                    }
                }
                b']' | b'}' => depth = depth.saturating_sub(1),
                _ => {}
            }
            if b != b' ' && b != b'\t' {
                last = b;
            }
        }
        i += 1;
    }
    Ok(())
}

pub fn split_documents<'a>(
    file: &str,
    text: &'a str,
) -> Result<Vec<(&'a str, usize)>, RenderError> {
    check_nesting(file, text)?;
    let mut docs = Vec::new();
    let mut start = 0;
    let mut start_line = 0;
    let mut pos = 0;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let trimmed = line.trim_end();
        if trimmed == "---" || trimmed.starts_with("--- ") || trimmed == "..." {
            docs.push((&text[start..pos], start_line));
            start = pos + line.len();
            start_line = i + 1;
        }
        pos += line.len();
    }
    docs.push((&text[start..], start_line));
    docs.retain(|(d, _)| !d.trim().is_empty());
    if docs.len() > MAX_DOCUMENTS_PER_FILE {
        return Err(RenderError::invalid(
            file,
            None,
            None,
            format!("more than {MAX_DOCUMENTS_PER_FILE} documents"),
        ));
    }
    Ok(docs)
}

/// Deserialises `text` strictly into `T`, reporting the field path and line.
pub fn parse_typed<T: DeserializeOwned>(
    file: &str,
    text: &str,
    offset: usize,
) -> Result<T, RenderError> {
    check_nesting(file, text)?;
    let de = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let field = (path != ".").then_some(path);
        yaml_error(file, offset, field, e.inner())
    })
}

pub fn yaml_error(
    file: &str,
    offset: usize,
    field: Option<String>,
    e: &serde_yaml::Error,
) -> RenderError {
    let message = e.to_string();
    let reason = match message.rsplit_once(" at line ") {
        Some((head, _)) => head.to_string(),
        None => message,
    };
    let reason = reason
        .split_once(": ")
        .filter(|(head, _)| {
            field.as_deref().is_some_and(|f| f.starts_with(head.trim())) && !head.contains(' ')
        })
        .map(|(_, tail)| tail.to_string())
        .unwrap_or(reason);
    RenderError::Invalid {
        file: file.to_string(),
        line: e.location().map(|l| l.line() + offset),
        field,
        reason: scrub(&reason),
    }
}

/// Removes quoted values from a parser message ("invalid type: string
/// \"hunter2\", expected …"): a manifest value may be a secret.
pub fn scrub(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(i) = rest.find(" \"") {
        let (head, tail) = rest.split_at(i);
        out.push_str(head);
        match tail[2..].find('"') {
            Some(j) => {
                out.push_str(" \"…\"");
                rest = &tail[2 + j + 1..];
            }
            None => {
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// Best-effort line of a nested key: the first line holding `keys[0]`, then
/// from there the first holding `keys[1]`, and so on. 1-based.
pub fn find_line(text: &str, keys: &[&str]) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let mut at = 0;
    let mut found = None;
    for key in keys {
        let i = lines[at..].iter().position(|l| {
            let l = l.trim_start().trim_start_matches("- ");
            l.starts_with(&format!("{key}:"))
                || l.contains(&format!(" {key}"))
                || l == *key
                || l.contains(&format!("[{key}"))
                || l.contains(&format!("{key}]"))
                || l.contains(&format!("name: {key}"))
        })?;
        at += i;
        found = Some(at + 1);
    }
    found
}

/// One YAML document read as JSON, the way Kubernetes reads manifests
/// (sigs.k8s.io/yaml): scalar keys become strings, and a key given twice
/// in one mapping is an error, not a silent override. Parsed straight from
/// the text, with no intermediate YAML tree.
pub struct Json(pub serde_json::Value);

impl<'de> serde::Deserialize<'de> for Json {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(JsonVisitor).map(Json)
    }
}

struct JsonVisitor;

impl<'de> serde::de::Visitor<'de> for JsonVisitor {
    type Value = serde_json::Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a YAML document that is valid JSON")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Self::Value, E> {
        serde_json::Number::from_f64(v)
            .map(serde_json::Value::Number)
            .ok_or_else(|| E::custom("a number JSON cannot hold (.nan or .inf)"))
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }

    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }

    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(Json(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(serde_json::Value::Array(out))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        use serde::de::Error;
        let mut out = serde_json::Map::new();
        while let Some(Key(k)) = map.next_key()? {
            let Json(v) = map.next_value()?;
            if out.contains_key(&k) {
                return Err(A::Error::custom(format!("duplicate key {k:?}")));
            }
            out.insert(k, v);
        }
        Ok(serde_json::Value::Object(out))
    }
}

/// A mapping key: a string, or a scalar written as one.
struct Key(String);

impl<'de> serde::Deserialize<'de> for Key {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = String;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string, number or boolean key")
            }
            fn visit_str<E>(self, v: &str) -> Result<String, E> {
                Ok(v.to_string())
            }
            fn visit_string<E>(self, v: String) -> Result<String, E> {
                Ok(v)
            }
            fn visit_bool<E>(self, v: bool) -> Result<String, E> {
                Ok(v.to_string())
            }
            fn visit_i64<E>(self, v: i64) -> Result<String, E> {
                Ok(v.to_string())
            }
            fn visit_u64<E>(self, v: u64) -> Result<String, E> {
                Ok(v.to_string())
            }
            fn visit_f64<E>(self, v: f64) -> Result<String, E> {
                Ok(v.to_string())
            }
            fn visit_unit<E>(self) -> Result<String, E> {
                Ok("null".to_string())
            }
        }
        d.deserialize_any(V).map(Key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(text: &str) -> Result<serde_json::Value, String> {
        serde_yaml::from_str::<Json>(text)
            .map(|Json(v)| v)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn deep_nesting_is_refused_before_parsing() {
        // 100,000 brackets: refused at once, naming the line.
        let deep = format!("a:\n  b: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
        let e = check_nesting("x.yaml", &deep).unwrap_err().to_string();
        assert!(e.contains("x.yaml:2") && e.contains("64 levels"), "{e}");
        let dashes = format!("{}x\n", "- ".repeat(1000));
        assert!(check_nesting("d.yaml", &format!("list:\n{dashes}")).is_err());
        // Brackets in quotes and comments, apostrophes in plain text, and
        // ordinary flow collections are fine.
        let fine = "a: \"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\"\nb: don't\nd: [x, {y: [1]}]\n# [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\nc: '[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[['\n";
        check_nesting("f.yaml", fine).unwrap();
        assert!(json(fine).is_ok());
    }

    #[test]
    fn yaml_reads_as_kubernetes_reads_it() {
        assert_eq!(
            json("a: 1\nb: [true, null, 2.5, x]\n3: three\ntrue: yes\n").unwrap(),
            serde_json::json!({"a": 1, "b": [true, null, 2.5, "x"], "3": "three", "true": "yes"})
        );
        let e = json("metadata:\n  name: a\n  name: b\n").unwrap_err();
        assert!(e.contains("duplicate key \"name\""), "{e}");
        assert!(json("x: .nan\n").is_err());
    }
}
