//! The report: one item per check, rendered as text (✔/✘ with hints) or JSON.

use serde::Serialize;

/// The outcome of one item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Fail,
    /// Could not be judged (something it depends on is missing, or there is
    /// nothing to compare with); the detail says why. Does not fail the run.
    Skipped,
}

impl Status {
    pub fn symbol(self) -> &'static str {
        match self {
            Status::Pass => "✔",
            Status::Fail => "✘",
            Status::Skipped => "–",
        }
    }
}

/// One checked item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Item {
    /// Stable identifier, e.g. `webhook-ca-bundle`.
    pub id: &'static str,
    /// The heading it is listed under.
    pub category: &'static str,
    /// What is checked.
    pub description: String,
    pub status: Status,
    /// What was found.
    pub detail: String,
    /// How to fix it; set on failures.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

impl Item {
    fn new(
        id: &'static str,
        category: &'static str,
        description: impl Into<String>,
        status: Status,
        detail: impl Into<String>,
        hint: Option<String>,
    ) -> Self {
        Self {
            id,
            category,
            description: description.into(),
            status,
            detail: detail.into(),
            hint,
        }
    }

    pub fn pass(
        id: &'static str,
        category: &'static str,
        description: impl Into<String>,
        detail: impl Into<String>,
    ) -> Self {
        Self::new(id, category, description, Status::Pass, detail, None)
    }

    pub fn fail(
        id: &'static str,
        category: &'static str,
        description: impl Into<String>,
        detail: impl Into<String>,
        hint: impl Into<String>,
    ) -> Self {
        let hint = Some(hint.into());
        Self::new(id, category, description, Status::Fail, detail, hint)
    }

    pub fn skipped(
        id: &'static str,
        category: &'static str,
        description: impl Into<String>,
        detail: impl Into<String>,
    ) -> Self {
        Self::new(id, category, description, Status::Skipped, detail, None)
    }
}

/// An item's id, heading and description, to be given its outcome.
pub struct ItemHead {
    id: &'static str,
    category: &'static str,
    description: String,
}

impl ItemHead {
    pub fn new(id: &'static str, category: &'static str, description: impl Into<String>) -> Self {
        Self {
            id,
            category,
            description: description.into(),
        }
    }

    pub fn pass(&self, detail: impl Into<String>) -> Item {
        Item::pass(self.id, self.category, self.description.clone(), detail)
    }

    pub fn fail(&self, detail: impl Into<String>, hint: impl Into<String>) -> Item {
        let description = self.description.clone();
        Item::fail(self.id, self.category, description, detail, hint)
    }

    pub fn skipped(&self, detail: impl Into<String>) -> Item {
        Item::skipped(self.id, self.category, self.description.clone(), detail)
    }
}

/// Every item, in the order checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// No item failed.
    pub ok: bool,
    pub items: Vec<Item>,
}

impl Report {
    pub fn new(items: Vec<Item>) -> Self {
        Self {
            ok: items.iter().all(|i| i.status != Status::Fail),
            items,
        }
    }

    pub fn item(&self, id: &str) -> Option<&Item> {
        self.items.iter().find(|i| i.id == id)
    }

    pub fn failed(&self) -> usize {
        self.items
            .iter()
            .filter(|i| i.status == Status::Fail)
            .count()
    }

    /// Like `linkerd check`: a heading per category, a line per item, the
    /// detail and the hint indented below it.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let mut category = None;
        for item in &self.items {
            if category != Some(item.category) {
                if category.is_some() {
                    out.push('\n');
                }
                out.push_str(item.category);
                out.push('\n');
                out.push_str(&"-".repeat(item.category.chars().count()));
                out.push('\n');
                category = Some(item.category);
            }
            out.push_str(&format!("{} {}\n", item.status.symbol(), item.description));
            for line in item.detail.lines() {
                out.push_str(&format!("    {line}\n"));
            }
            if let Some(hint) = &item.hint {
                let mut lines = hint.lines();
                if let Some(first) = lines.next() {
                    out.push_str(&format!("    hint: {first}\n"));
                }
                for line in lines {
                    out.push_str(&format!("          {line}\n"));
                }
            }
        }
        let skipped = self
            .items
            .iter()
            .filter(|i| i.status == Status::Skipped)
            .count();
        let not_checked = if skipped > 0 {
            format!(" ({skipped} not checked)")
        } else {
            String::new()
        };
        out.push('\n');
        if self.ok {
            out.push_str(&format!("Status check results are ✔{not_checked}\n"));
        } else {
            out.push_str(&format!(
                "Status check results are ✘: {} of {} failed{not_checked}\n",
                self.failed(),
                self.items.len()
            ));
        }
        out
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("the report serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_groups_by_category_and_indents_hints() {
        let report = Report::new(vec![
            Item::pass("a", "webhook", "A exists", "found"),
            Item::fail("b", "webhook", "B works", "it broke", "fix it\nthen retry"),
            Item::skipped("c", "pods", "C is fresh", "not checked: nothing to compare"),
        ]);
        assert!(!report.ok);
        assert_eq!(
            report.to_text(),
            "webhook\n-------\n✔ A exists\n    found\n✘ B works\n    it broke\n    hint: fix it\n          then retry\n\npods\n----\n– C is fresh\n    not checked: nothing to compare\n\nStatus check results are ✘: 1 of 3 failed (1 not checked)\n"
        );
        let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        assert_eq!(json["ok"], false);
        assert_eq!(json["items"][1]["status"], "fail");
        assert_eq!(json["items"][1]["hint"], "fix it\nthen retry");
        assert!(json["items"][0].get("hint").is_none());
    }

    #[test]
    fn skipped_items_do_not_fail() {
        let report = Report::new(vec![
            Item::pass("a", "x", "A", ""),
            Item::skipped("b", "x", "B", "not checked"),
        ]);
        assert!(report.ok);
    }
}
