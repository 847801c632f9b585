//! Feature flags: `flags.yaml` in the repository, published to every host
//! target as an OpenFeature flagd flag-definition file (`flags.json` under
//! the target's file root), so applications read them with a standard
//! provider. Flipping a flag changes only that file: no redeploy, no
//! restart. Pure.

use std::collections::BTreeMap;

use chrono::NaiveDate;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// The flags file at the root of the watched path.
pub const FLAGS_FILE: &str = "flags.yaml";
/// Where it is published, relative to each host target's file root.
pub const FLAGS_PATH: &str = "flags.json";

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FlagsFile {
    pub api_version: String,
    pub kind: FlagsKind,
    pub flags: BTreeMap<String, Flag>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub enum FlagsKind {
    Flags,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FlagKind {
    Release,
    Experiment,
    Ops,
    Permission,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FlagState {
    Enabled,
    Disabled,
}

/// One flag. Every flag has an owner and an expiry date: flags are debt.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Flag {
    pub kind: FlagKind,
    /// Who to ask (required by the default guardrail).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// YYYY-MM-DD; after it the flag is reported as expired (required by
    /// the default guardrail).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<NaiveDate>,
    pub state: FlagState,
    /// Variant name → value (default: on = true, off = false).
    #[serde(default = "on_off")]
    pub variants: BTreeMap<String, Value>,
    /// The variant served by default.
    pub default: String,
    /// Per target: the variant served there instead.
    #[serde(default)]
    pub targets: BTreeMap<String, String>,
    /// Segments: when an evaluation-context attribute equals a value, serve
    /// a variant (first match wins), e.g. `{attribute: region, equals: eu,
    /// variant: off}`.
    #[serde(default)]
    pub segments: Vec<Segment>,
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Segment {
    pub attribute: String,
    pub equals: Value,
    pub variant: String,
}

fn on_off() -> BTreeMap<String, Value> {
    [
        ("on".to_string(), json!(true)),
        ("off".to_string(), json!(false)),
    ]
    .into()
}

impl FlagsFile {
    /// Checks variants and target names; errors name the flag and field.
    /// (Owners and expiry dates are the default guardrail's business, so a
    /// repository's policy decides.)
    pub fn validate(&self, targets: &[&str]) -> Result<(), (String, String)> {
        for (name, f) in &self.flags {
            let at = |field: &str| format!("flags.{name}.{field}");
            let known = |v: &str| f.variants.contains_key(v);
            if !known(&f.default) {
                return Err((at("default"), format!("no variant {:?}", f.default)));
            }
            for (t, v) in &f.targets {
                if !targets.contains(&t.as_str()) {
                    return Err((at("targets"), format!("unknown target {t:?}")));
                }
                if !known(v) {
                    return Err((
                        at("targets"),
                        format!("no variant {v:?} (for target {t:?})"),
                    ));
                }
            }
            for (i, s) in f.segments.iter().enumerate() {
                if !known(&s.variant) {
                    return Err((
                        format!("flags.{name}.segments[{i}].variant"),
                        format!("no variant {:?}", s.variant),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The flagd flag-definition document for one target.
    pub fn flagd(&self, target: &str) -> Value {
        let mut flags = serde_json::Map::new();
        for (name, f) in &self.flags {
            let default = f.targets.get(target).unwrap_or(&f.default);
            let mut def = json!({
                "state": if f.state == FlagState::Enabled { "ENABLED" } else { "DISABLED" },
                "variants": f.variants,
                "defaultVariant": default,
            });
            // Segments become flagd targeting (JsonLogic): the first
            // matching segment's variant, else the default.
            if !f.segments.is_empty() {
                let mut rule = json!(default);
                for s in f.segments.iter().rev() {
                    rule = json!({ "if": [{ "==": [{ "var": s.attribute }, s.equals] }, s.variant, rule] });
                }
                def["targeting"] = rule;
            }
            let mut metadata = json!({ "kind": f.kind });
            if let Some(owner) = &f.owner {
                metadata["owner"] = json!(owner);
            }
            if let Some(expires) = f.expires {
                metadata["expires"] = json!(expires.to_string());
            }
            def["metadata"] = metadata;
            flags.insert(name.clone(), def);
        }
        json!({ "$schema": "https://flagd.dev/schema/v0/flags.json", "flags": flags })
    }

    /// Flags past their expiry date on `today`.
    pub fn expired(&self, today: NaiveDate) -> Vec<(&String, &Flag)> {
        self.flags
            .iter()
            .filter(|(_, f)| f.expires.is_some_and(|e| e < today))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file() -> FlagsFile {
        serde_yaml::from_str(
            "apiVersion: sluice.dev/v1\nkind: Flags\nflags:\n  new-checkout:\n    kind: release\n    owner: shop-team\n    expires: 2027-01-31\n    state: enabled\n    default: on\n    targets:\n      eu: off\n    segments:\n      - attribute: plan\n        equals: beta\n        variant: on\n",
        )
        .unwrap()
    }

    #[test]
    fn per_target_defaults_and_segments_become_flagd() {
        let f = file();
        f.validate(&["eu", "us"]).unwrap();
        let eu = f.flagd("eu");
        let flag = &eu["flags"]["new-checkout"];
        assert_eq!(flag["state"], "ENABLED");
        assert_eq!(flag["defaultVariant"], "off");
        assert_eq!(flag["targeting"]["if"][1], "on");
        assert_eq!(flag["targeting"]["if"][2], "off");
        assert_eq!(
            f.flagd("us")["flags"]["new-checkout"]["defaultVariant"],
            "on"
        );
    }

    #[test]
    fn unknown_variants_and_targets_are_refused() {
        let mut f = file();
        assert_eq!(
            f.validate(&["us"]).unwrap_err().0,
            "flags.new-checkout.targets"
        );
        f.flags.get_mut("new-checkout").unwrap().default = "maybe".into();
        assert_eq!(
            f.validate(&["eu"]).unwrap_err().0,
            "flags.new-checkout.default"
        );
    }

    #[test]
    fn expiry_is_by_date() {
        let f = file();
        assert!(f
            .expired(NaiveDate::from_ymd_opt(2027, 1, 31).unwrap())
            .is_empty());
        assert_eq!(
            f.expired(NaiveDate::from_ymd_opt(2027, 2, 1).unwrap())
                .len(),
            1
        );
    }
}
