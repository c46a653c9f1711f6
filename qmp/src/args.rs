//! Argument checking as QEMU's QAPI visitors do it: members are taken one by one (a missing one
//! is "Parameter 'X' is missing", a wrong type "Invalid parameter type for 'X', expected: T"),
//! and whatever is left over is "Parameter 'X' is unexpected". Nested members are named by
//! their path (`actions[0].data.name`).

use serde_json::{Map, Value};

use crate::QmpError;

/// The members of one argument object, being taken.
pub struct Args<'a> {
    obj: Option<&'a Map<String, Value>>,
    prefix: String,
    taken: Vec<&'a str>,
}

impl<'a> Args<'a> {
    /// The object `value` (absent means empty), named `path` in messages ("" at the top).
    pub fn new(value: Option<&'a Value>, path: &str) -> Result<Args<'a>, QmpError> {
        let obj = match value {
            None => None,
            Some(Value::Object(o)) => Some(o),
            Some(_) => {
                let name = if path.is_empty() { "arguments" } else { path };
                return Err(QmpError::generic(format!(
                    "Invalid parameter type for '{name}', expected: object"
                )));
            }
        };
        Ok(Args {
            obj,
            prefix: if path.is_empty() {
                String::new()
            } else {
                format!("{path}.")
            },
            taken: Vec::new(),
        })
    }

    /// The full name of member `name`.
    pub fn path(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// Member `name` if present.
    pub fn opt(&mut self, name: &'a str) -> Option<&'a Value> {
        self.taken.push(name);
        self.obj?.get(name)
    }

    fn wrong(&self, name: &str, expected: &str) -> QmpError {
        QmpError::generic(format!(
            "Invalid parameter type for '{}', expected: {expected}",
            self.path(name)
        ))
    }

    /// Member `name`, required.
    pub fn req(&mut self, name: &'a str) -> Result<&'a Value, QmpError> {
        let path = self.path(name);
        self.opt(name)
            .ok_or_else(|| QmpError::generic(format!("Parameter '{path}' is missing")))
    }

    pub fn str(&mut self, name: &'a str) -> Result<String, QmpError> {
        let v = self.req(name)?;
        v.as_str()
            .map(str::to_string)
            .ok_or_else(|| self.wrong(name, "string"))
    }

    pub fn opt_str(&mut self, name: &'a str) -> Result<Option<String>, QmpError> {
        match self.opt(name) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(|s| Some(s.to_string()))
                .ok_or_else(|| self.wrong(name, "string")),
        }
    }

    pub fn opt_bool(&mut self, name: &'a str) -> Result<Option<bool>, QmpError> {
        match self.opt(name) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.wrong(name, "boolean")),
        }
    }

    pub fn opt_u64(&mut self, name: &'a str) -> Result<Option<u64>, QmpError> {
        match self.opt(name) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| self.wrong(name, "integer")),
        }
    }

    pub fn array(&mut self, name: &'a str) -> Result<&'a Vec<Value>, QmpError> {
        let v = self.req(name)?;
        v.as_array().ok_or_else(|| self.wrong(name, "array"))
    }

    /// Refuses members nobody took.
    pub fn done(self) -> Result<(), QmpError> {
        let Some(obj) = self.obj else { return Ok(()) };
        match obj.keys().find(|k| !self.taken.contains(&k.as_str())) {
            Some(k) => Err(QmpError::generic(format!(
                "Parameter '{}{k}' is unexpected",
                self.prefix
            ))),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn missing_wrong_and_unexpected_members_are_named_by_path() {
        let v = json!({"name": 5, "extra": true});
        let mut a = Args::new(Some(&v), "actions[0].data").unwrap();
        assert_eq!(
            a.str("device").unwrap_err().desc,
            "Parameter 'actions[0].data.device' is missing"
        );
        assert_eq!(
            a.str("name").unwrap_err().desc,
            "Invalid parameter type for 'actions[0].data.name', expected: string"
        );
        assert_eq!(
            a.done().unwrap_err().desc,
            "Parameter 'actions[0].data.extra' is unexpected"
        );
    }
}
