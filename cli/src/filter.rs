//! `--filter KEY OP VALUE` for `deepmad results`: row filters over a sweep's exported results.
//!
//! A filter is one comparison, `top1>=0.9`, `block=basic`, `params<2M`, `rho!=0.5`; several
//! filters must all hold. Numeric keys take numbers with the design units (`20K`, `4M`, `1.5G`),
//! text keys (`block`, `dataset`) take `=` and `!=` only. A malformed filter is a usage error
//! that names it, found before anything is asked of the coordinator.

use deepmad_design::units::parse_count;
use deepmad_proto::v1;

use crate::render::family_name;

/// The comparison of a filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// Operators, longest spelling first so `<=` is not read as `<`.
const OPS: [(&str, Op); 7] = [
    ("<=", Op::Le),
    (">=", Op::Ge),
    ("!=", Op::Ne),
    ("==", Op::Eq),
    ("<", Op::Lt),
    (">", Op::Gt),
    ("=", Op::Eq),
];

/// Reads a numeric column of a row (`None` when the row has no value there).
type ReadNumber = fn(&v1::ResultRow) -> Option<f64>;
/// Reads a text column of a row.
type ReadText = fn(&v1::ResultRow) -> String;

/// Numeric columns a filter may name, and how to read each from a row.
const NUMERIC: [(&str, ReadNumber); 13] = [
    ("seed", |r| Some(r.seed as f64)),
    ("rho", |r| r.rho),
    ("params", |r| Some(r.params as f64)),
    ("flops", |r| Some(r.flops as f64)),
    ("layers", |r| Some(f64::from(r.layers))),
    ("effectiveness", |r| Some(r.effectiveness)),
    ("entropy", |r| Some(r.entropy)),
    ("top1", |r| Some(r.top1)),
    ("top5", |r| Some(r.top5)),
    ("test_loss", |r| Some(r.test_loss)),
    ("train_seconds", |r| Some(r.train_seconds)),
    ("epochs", |r| Some(f64::from(r.epochs))),
    ("trial_id", |r| r.trial_id.parse().ok()),
];

/// Text columns a filter may name.
const TEXT: [(&str, ReadText); 3] = [
    ("block", |r| family_name(r.family).to_string()),
    ("dataset", |r| r.dataset.clone()),
    ("design_id", |r| r.design_id.clone()),
];

#[derive(Clone, Debug)]
enum Column {
    Numeric(ReadNumber, f64),
    Text(ReadText, String),
}

/// One parsed `--filter`.
#[derive(Clone, Debug)]
pub struct Filter {
    column: Column,
    op: Op,
}

impl Filter {
    /// Parses `KEY OP VALUE`; the error names the filter and what is wrong with it.
    pub fn parse(text: &str) -> Result<Filter, String> {
        let fail = |why: String| format!("--filter {text:?}: {why}");
        let (at, spelling, op) = OPS
            .iter()
            .filter_map(|(spelling, op)| text.find(spelling).map(|at| (at, *spelling, *op)))
            .min_by_key(|(at, spelling, _)| (*at, usize::MAX - spelling.len()))
            .ok_or_else(|| fail("expected KEY OP VALUE with OP one of = != < <= > >=".into()))?;
        let key = text[..at].trim().to_ascii_lowercase();
        let value = text[at + spelling.len()..].trim();
        if value.is_empty() {
            return Err(fail("the value is missing".into()));
        }
        let key = match key.as_str() {
            "family" => "block",
            "loss" => "test_loss",
            other => other,
        };
        if let Some((_, read)) = NUMERIC.iter().find(|(name, _)| *name == key) {
            let number = parse_number(value).ok_or_else(|| {
                fail(format!("{value:?} is not a number (units K, M, G allowed)"))
            })?;
            return Ok(Filter {
                column: Column::Numeric(*read, number),
                op,
            });
        }
        if let Some((_, read)) = TEXT.iter().find(|(name, _)| *name == key) {
            if !matches!(op, Op::Eq | Op::Ne) {
                return Err(fail(format!("{key} is text: use = or !=")));
            }
            return Ok(Filter {
                column: Column::Text(*read, value.to_string()),
                op,
            });
        }
        let known: Vec<&str> = NUMERIC
            .iter()
            .map(|(name, _)| *name)
            .chain(TEXT.iter().map(|(name, _)| *name))
            .collect();
        Err(fail(format!(
            "unknown key {key:?}; known keys: {}",
            known.join(", ")
        )))
    }

    /// Returns true when `row` passes (a row without the column, e.g. no rho, never passes).
    pub fn accepts(&self, row: &v1::ResultRow) -> bool {
        match &self.column {
            Column::Numeric(read, wanted) => read(row).is_some_and(|value| match self.op {
                Op::Eq => value == *wanted,
                Op::Ne => value != *wanted,
                Op::Lt => value < *wanted,
                Op::Le => value <= *wanted,
                Op::Gt => value > *wanted,
                Op::Ge => value >= *wanted,
            }),
            Column::Text(read, wanted) => (read(row) == *wanted) == (self.op == Op::Eq),
        }
    }
}

/// A plain number, or a count with a unit (`20K`, `1.5M`).
fn parse_number(text: &str) -> Option<f64> {
    text.parse::<f64>()
        .ok()
        .filter(|number| number.is_finite())
        .or_else(|| parse_count("filter", text).ok().map(|count| count as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row() -> v1::ResultRow {
        v1::ResultRow {
            trial_id: "7".into(),
            family: v1::Family::Basic as i32,
            dataset: "idx:data/mnist-subset".into(),
            seed: 1,
            rho: Some(0.5),
            params: 2_000_000,
            top1: 0.93,
            ..v1::ResultRow::default()
        }
    }

    fn passes(filter: &str) -> bool {
        Filter::parse(filter).unwrap().accepts(&row())
    }

    #[test]
    fn comparisons_read_the_named_column() {
        assert!(passes("top1>=0.9"));
        assert!(!passes("top1 > 0.95"));
        assert!(passes("rho=0.5"));
        assert!(passes("rho!=0.3"));
        assert!(passes("params<=2M"));
        assert!(!passes("params<2M"));
        assert!(passes("block=basic"));
        assert!(passes("family!=mbconv"));
        assert!(passes("seed==1"));
        assert!(passes("trial_id=7"));
    }

    #[test]
    fn bad_filters_name_themselves_and_the_problem() {
        for (text, expected) in [
            ("top1", "expected KEY OP VALUE"),
            ("accuracy>0.5", "unknown key"),
            ("top1>", "value is missing"),
            ("top1>high", "not a number"),
            ("block<basic", "use = or !="),
        ] {
            let error = Filter::parse(text).unwrap_err();
            assert!(error.contains(text), "{error}");
            assert!(error.contains(expected), "{error}");
        }
    }
}
