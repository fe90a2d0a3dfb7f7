//! Reading and writing TinyNAS structure files: the released Python-literal form and JSON.

use super::literal::{self, Node, Value};
use super::{file_key, SuperBlock, TinyBlock, TinyNet, CLASS_NAMES};
use crate::arch::MAX_DIMENSION;
use crate::error::DesignError;

const FORMAT: &str = "TinyNAS structure";

/// The keys a `ConvKXBNRELU` may carry.
const CONV_KEYS: [&str; 5] = ["class", "in", "out", "k", "s"];
/// The keys a super-block may carry (`inner_class` is accepted and ignored, as that code
/// overwrites it in `SuperResK1KXK1.__init__` and its siblings).
const SUPER_KEYS: [&str; 8] = ["class", "in", "out", "k", "s", "btn", "L", "inner_class"];

fn malformed(location: String, reason: String) -> DesignError {
    DesignError::Malformed {
        format: FORMAT,
        location,
        reason,
    }
}

impl TinyNet {
    /// Parses every structure in `text`: the released Python literal
    /// `{'best_structures': [[block, ...], ...], 'space_arch': 'CnnNet'}`, the same in JSON, or
    /// a JSON (or Python) list of block dicts, or a list of such lists. Each structure is
    /// validated. Errors name the line and column (syntax) or the block (content), e.g.
    /// `block 3 ('SuperResK1KXK1')`, with `structure 2, ` before it in multi-structure files.
    pub fn parse_all(text: &str) -> Result<Vec<TinyNet>, DesignError> {
        let root =
            literal::parse(text).map_err(|error| malformed(error.at.to_string(), error.reason))?;
        let structures = structure_lists(&root)?;
        let many = structures.len() > 1;
        let mut nets = Vec::with_capacity(structures.len());
        for (structure, blocks) in structures.iter().enumerate() {
            let prefix = if many {
                format!("structure {structure}, ")
            } else {
                String::new()
            };
            nets.push(read_structure(blocks, &prefix)?);
        }
        Ok(nets)
    }

    /// Returns the released-file form, one block per line with pprint's sorted keys; it reads
    /// back through [`TinyNet::parse_all`] and through the official code's `ast.literal_eval`.
    pub fn to_python_literal(&self) -> String {
        let blocks: Vec<String> = self.blocks.iter().map(python_block).collect();
        format!(
            "{{ 'best_structures':[ [\n    {}]],\n'space_arch': 'CnnNet'}}\n",
            blocks.join(",\n    ")
        )
    }

    /// Returns a JSON list of block dicts with the keys `class`, `in`, `out`, `k`, `s`, and
    /// `btn`, `L` for super-blocks, one block per line.
    pub fn to_json(&self) -> String {
        let blocks: Vec<String> = self.blocks.iter().map(json_block).collect();
        format!("[\n  {}\n]\n", blocks.join(",\n  "))
    }
}

fn python_block(block: &TinyBlock) -> String {
    let class = block.class_name();
    let (i, o, k, s) = (
        block.in_channels(),
        block.out(),
        block.kernel(),
        block.stride(),
    );
    match (block.super_block(), block.inner_class_name()) {
        (Some(shape), Some(inner)) => format!(
            "{{'L': {}, 'btn': {}, 'class': '{class}', 'in': {i}, 'inner_class': '{inner}', 'k': {k}, 'out': {o}, 's': {s}}}",
            shape.depth, shape.btn
        ),
        _ => format!("{{'class': '{class}', 'in': {i}, 'k': {k}, 'out': {o}, 's': {s}}}"),
    }
}

fn json_block(block: &TinyBlock) -> String {
    let class = block.class_name();
    let (i, o, k, s) = (
        block.in_channels(),
        block.out(),
        block.kernel(),
        block.stride(),
    );
    match block.super_block() {
        Some(shape) => format!(
            "{{\"class\": \"{class}\", \"in\": {i}, \"out\": {o}, \"btn\": {}, \"k\": {k}, \"s\": {s}, \"L\": {}}}",
            shape.btn, shape.depth
        ),
        None => format!("{{\"class\": \"{class}\", \"in\": {i}, \"out\": {o}, \"k\": {k}, \"s\": {s}}}"),
    }
}

/// Finds the structures (lists of block nodes) in the parsed file.
fn structure_lists(root: &Node) -> Result<Vec<&[Node]>, DesignError> {
    match &root.value {
        Value::Dict(entries) => {
            let best = best_structures(entries, root)?;
            let Value::List(items) = &best.value else {
                return Err(malformed(
                    best.at.to_string(),
                    format!(
                        "'best_structures' must be a list, not {}",
                        best.value.describe()
                    ),
                ));
            };
            nested_lists(items, best)
        }
        Value::List(items)
            if items
                .iter()
                .all(|item| matches!(item.value, Value::Dict(_))) =>
        {
            if items.is_empty() {
                let reason = "the list of blocks is empty".to_string();
                return Err(malformed(root.at.to_string(), reason));
            }
            Ok(vec![items.as_slice()])
        }
        Value::List(items) => nested_lists(items, root),
        other => Err(malformed(
            root.at.to_string(),
            format!(
                "expected a dict with 'best_structures' or a list of blocks, not {}",
                other.describe()
            ),
        )),
    }
}

/// Returns the `'best_structures'` entry of the released files' top-level dict, after
/// checking its other keys (only `'space_arch': 'CnnNet'` is allowed).
fn best_structures<'a>(
    entries: &'a [(String, Node)],
    root: &Node,
) -> Result<&'a Node, DesignError> {
    let mut best = None;
    for (key, node) in entries {
        match key.as_str() {
            "best_structures" => best = Some(node),
            "space_arch" => check_space(node)?,
            other => {
                let reason =
                    format!("unknown key {other:?} (expected 'best_structures' and 'space_arch')");
                return Err(malformed(node.at.to_string(), reason));
            }
        }
    }
    best.ok_or_else(|| {
        malformed(
            root.at.to_string(),
            "the key 'best_structures' is missing".into(),
        )
    })
}

/// Reads a list of structures, each a list of block dicts.
fn nested_lists<'a>(items: &'a [Node], list: &Node) -> Result<Vec<&'a [Node]>, DesignError> {
    if items.is_empty() {
        return Err(malformed(
            list.at.to_string(),
            "the list of structures is empty".into(),
        ));
    }
    items
        .iter()
        .map(|item| match &item.value {
            Value::List(blocks) if !blocks.is_empty() => Ok(blocks.as_slice()),
            Value::List(_) => Err(malformed(
                item.at.to_string(),
                "a structure has no blocks".into(),
            )),
            other => Err(malformed(
                item.at.to_string(),
                format!(
                    "expected a structure (a list of block dicts), not {}",
                    other.describe()
                ),
            )),
        })
        .collect()
}

fn check_space(node: &Node) -> Result<(), DesignError> {
    match &node.value {
        Value::Str(space) if space == "CnnNet" => Ok(()),
        other => Err(malformed(
            node.at.to_string(),
            format!(
                "'space_arch' must be 'CnnNet' (2-D CNNs), not {}",
                other.describe()
            ),
        )),
    }
}

/// Reads and validates one structure.
fn read_structure(blocks: &[Node], prefix: &str) -> Result<TinyNet, DesignError> {
    let mut net = TinyNet {
        blocks: Vec::with_capacity(blocks.len()),
    };
    for (index, node) in blocks.iter().enumerate() {
        net.blocks.push(read_block(node, index, prefix)?);
    }
    net.check().map_err(|problem| {
        let block = &net.blocks[problem.index];
        malformed(
            format!("{prefix}block {} ('{}')", problem.index, block.class_name()),
            format!(
                "'{}' {} (block at {})",
                file_key(problem.field),
                problem.reason,
                blocks[problem.index].at
            ),
        )
    })?;
    Ok(net)
}

/// Reads one block dict: its class, then its keys.
fn read_block(node: &Node, index: usize, prefix: &str) -> Result<TinyBlock, DesignError> {
    let Value::Dict(entries) = &node.value else {
        return Err(malformed(
            format!("{prefix}block {index}"),
            format!(
                "expected a block dict, not {} (at {})",
                node.value.describe(),
                node.at
            ),
        ));
    };
    let class = block_class(entries, node, &format!("{prefix}block {index}"))?;
    let location = format!("{prefix}block {index} ('{class}')");
    if !CLASS_NAMES.contains(&class) {
        let known = CLASS_NAMES.join(", ");
        let reason = format!("unknown class (known: {known}) (at {})", node.at);
        return Err(malformed(location, reason));
    }
    let is_conv = class == CLASS_NAMES[0];
    let fields = Fields {
        entries,
        block_at: node,
        location: &location,
    };
    fields.check_keys(if is_conv { &CONV_KEYS } else { &SUPER_KEYS })?;
    let (in_channels, out, kernel) = (fields.int("in")?, fields.int("out")?, fields.int("k")?);
    // That code reads a missing 's' as 1 (`1 if 's' not in structure_info`).
    let stride = fields.optional_int("s")?.unwrap_or(1);
    if is_conv {
        return Ok(TinyBlock::Conv {
            in_channels,
            out,
            kernel,
            stride,
        });
    }
    let shape = SuperBlock {
        in_channels,
        out,
        btn: fields.int("btn")?,
        kernel,
        stride,
        depth: fields.int("L")?,
    };
    Ok(match class {
        "SuperResK1KXK1" => TinyBlock::Bottleneck(shape),
        "SuperResK1DWK1" => TinyBlock::Depthwise(shape),
        _ => TinyBlock::DepthwiseSe(shape),
    })
}

/// Returns the block's `'class'` string.
fn block_class<'a>(
    entries: &'a [(String, Node)],
    node: &Node,
    location: &str,
) -> Result<&'a str, DesignError> {
    match entries.iter().find(|(key, _)| key == "class") {
        Some((_, found)) => match &found.value {
            Value::Str(class) => Ok(class.as_str()),
            other => {
                let reason = format!(
                    "'class' must be a string, not {} (at {})",
                    other.describe(),
                    found.at
                );
                Err(malformed(location.to_string(), reason))
            }
        },
        None => {
            let reason = format!("the key 'class' is missing (block at {})", node.at);
            Err(malformed(location.to_string(), reason))
        }
    }
}

/// The entries of one block dict, with what error messages need.
struct Fields<'a> {
    entries: &'a [(String, Node)],
    block_at: &'a Node,
    location: &'a str,
}

impl Fields<'_> {
    fn check_keys(&self, allowed: &[&str]) -> Result<(), DesignError> {
        for (key, node) in self.entries {
            if !allowed.contains(&key.as_str()) {
                return Err(malformed(
                    self.location.to_string(),
                    format!(
                        "unknown key {key:?} (this class takes {}) (at {})",
                        allowed.join(", "),
                        node.at
                    ),
                ));
            }
            if key == "inner_class" && !matches!(node.value, Value::Str(_)) {
                return Err(malformed(
                    self.location.to_string(),
                    format!(
                        "'inner_class' must be a string, not {} (at {})",
                        node.value.describe(),
                        node.at
                    ),
                ));
            }
        }
        Ok(())
    }

    fn int(&self, key: &str) -> Result<u32, DesignError> {
        self.optional_int(key)?.ok_or_else(|| {
            malformed(
                self.location.to_string(),
                format!("the key '{key}' is missing (block at {})", self.block_at.at),
            )
        })
    }

    /// Reads `key` as an integer in `1..=MAX_DIMENSION`, or `None` when it is absent.
    fn optional_int(&self, key: &str) -> Result<Option<u32>, DesignError> {
        let Some((_, node)) = self.entries.iter().find(|(name, _)| name == key) else {
            return Ok(None);
        };
        match node.value {
            Value::Int(value) if (1..=i64::from(MAX_DIMENSION)).contains(&value) => Ok(Some(
                u32::try_from(value).expect("bounded by MAX_DIMENSION"),
            )),
            ref other => Err(malformed(
                self.location.to_string(),
                format!(
                    "'{key}' must be an integer in 1..={MAX_DIMENSION}, not {} (at {})",
                    other.describe(),
                    node.at
                ),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{depthwise_example, se_reference, worked_example};
    use super::*;

    /// The SE reference file of the issue, verbatim from the official repository's released
    /// structures (its 'out' values are not multiples of 8; that is how it was released).
    const SE_REFERENCE: &str = "{ 'best_structures':[ [ 
{'class': 'ConvKXBNRELU', 'in': 3, 'k': 3, 'out': 40, 's': 2},
{ 'L': 2, 'btn': 240, 'class': 'SuperResK1DWSEK1', 'in': 40, 'inner_class': 'ResK1DWSEK1', 'k': 5, 'out': 40, 's': 1},
{ 'L': 4, 'btn': 512, 'class': 'SuperResK1DWSEK1', 'in': 40, 'inner_class': 'ResK1DWSEK1', 'k': 5, 'out': 85, 's': 2},
{ 'L': 6, 'btn': 800, 'class': 'SuperResK1DWSEK1', 'in': 85, 'inner_class': 'ResK1DWSEK1', 'k': 5, 'out': 134, 's': 2},
{ 'L': 6, 'btn': 1208, 'class': 'SuperResK1DWSEK1', 'in': 134, 'inner_class': 'ResK1DWSEK1', 'k': 5, 'out': 201, 's': 2},
{ 'L': 5, 'btn': 1872, 'class': 'SuperResK1DWSEK1', 'in': 201, 'inner_class': 'ResK1DWSEK1', 'k': 5, 'out': 312, 's': 2},
{'class': 'ConvKXBNRELU', 'in': 312, 'k': 1, 'out': 1792, 's': 1}]],
'space_arch': 'CnnNet'}";

    /// `configs/classification/models/deepmad-R18.txt` of the official repository, verbatim
    /// (trailing spaces included).
    const DEEPMAD_R18: &str = "{ 'best_structures':[ [ \n    {'class': 'ConvKXBNRELU', 'in': 3, 'k': 3, 'out': 32, 's': 2},\n    { 'L': 1, 'btn': 40, 'class': 'SuperResK1KXK1', 'in': 32, 'inner_class': 'ResK1KXK1', 'k': 5, 'out': 96, 's': 2},\n    { 'L': 6, 'btn': 40, 'class': 'SuperResK1KXK1', 'in': 96, 'inner_class': 'ResK1KXK1', 'k': 5, 'out': 384, 's': 2},\n    { 'L': 9, 'btn': 64, 'class': 'SuperResK1KXK1', 'in': 384, 'inner_class': 'ResK1KXK1', 'k': 5, 'out': 384, 's': 2},\n    { 'L': 10, 'btn': 104, 'class': 'SuperResK1KXK1', 'in': 384, 'inner_class': 'ResK1KXK1', 'k': 3, 'out': 1024, 's': 1},\n    { 'L': 12, 'btn': 104, 'class': 'SuperResK1KXK1', 'in': 1024, 'inner_class': 'ResK1KXK1', 'k': 5, 'out': 672, 's': 2}]],\n'space_arch': 'CnnNet'}  \n";

    fn only(text: &str) -> TinyNet {
        let mut nets = TinyNet::parse_all(text).unwrap();
        assert_eq!(nets.len(), 1);
        nets.remove(0)
    }

    fn error(text: &str) -> String {
        TinyNet::parse_all(text).unwrap_err().to_string()
    }

    #[test]
    fn parses_the_released_se_reference() {
        assert_eq!(only(SE_REFERENCE), se_reference());
    }

    #[test]
    fn parses_the_released_deepmad_r18() {
        let net = only(DEEPMAD_R18);
        assert_eq!(net.blocks.len(), 6);
        assert_eq!(net.stage_count(), 5);
        let TinyBlock::Bottleneck(last) = net.blocks[5] else {
            panic!("not a bottleneck: {:?}", net.blocks[5])
        };
        assert_eq!(
            (
                last.in_channels,
                last.out,
                last.btn,
                last.kernel,
                last.stride,
                last.depth
            ),
            (1024, 672, 104, 5, 2, 12)
        );
    }

    #[test]
    fn parses_json_forms() {
        let list = r#"[{"class": "ConvKXBNRELU", "in": 3, "out": 40, "k": 3, "s": 2},
            {"class": "SuperResK1DWSEK1", "in": 40, "out": 40, "btn": 240, "k": 5, "s": 1, "L": 2}]"#;
        let net = only(list);
        assert_eq!(net.blocks[..], se_reference().blocks[..2]);
        let wrapped =
            format!("{{\"best_structures\": [{list}, {list}], \"space_arch\": \"CnnNet\"}}");
        let nets = TinyNet::parse_all(&wrapped).unwrap();
        assert_eq!(nets, vec![net.clone(), net]);
    }

    #[test]
    fn python_quirks_are_accepted() {
        let text = "{'best_structures': [[\n  {'class': 'ConvKXBNRELU', 'in': 3, \\\n   'out': 32, 'k': 3,},  # stem, stride defaults to 1\n],],}";
        let net = only(text);
        assert_eq!(net.blocks, vec![super::super::tests::conv(3, 32, 3, 1)]);
    }

    #[test]
    fn writers_round_trip() {
        for net in [worked_example(), se_reference(), depthwise_example()] {
            assert_eq!(only(&net.to_python_literal()), net);
            assert_eq!(only(&net.to_json()), net);
            let json: serde_json::Value = serde_json::from_str(&net.to_json()).unwrap();
            assert_eq!(json.as_array().map(Vec::len), Some(net.blocks.len()));
        }
        let literal = se_reference().to_python_literal();
        assert!(literal.contains("{'L': 2, 'btn': 240, 'class': 'SuperResK1DWSEK1', 'in': 40, 'inner_class': 'ResK1DWSEK1', 'k': 5, 'out': 40, 's': 1},\n"), "{literal}");
        assert_eq!(literal.lines().count(), se_reference().blocks.len() + 2);
    }

    #[test]
    fn content_errors_name_the_block() {
        let unknown = SE_REFERENCE.replacen(
            "'class': 'SuperResK1DWSEK1', 'in': 85",
            "'class': 'SuperResK9', 'in': 85",
            1,
        );
        let message = error(&unknown);
        assert!(
            message.contains("at block 3 ('SuperResK9'): unknown class"),
            "{message}"
        );
        let missing = SE_REFERENCE.replacen("'btn': 512, ", "", 1);
        let message = error(&missing);
        assert!(
            message.contains(
                "at block 2 ('SuperResK1DWSEK1'): the key 'btn' is missing (block at line 4"
            ),
            "{message}"
        );
        let chain = SE_REFERENCE.replacen("'in': 134", "'in': 136", 1);
        let message = error(&chain);
        assert!(
            message.contains(
                "at block 4 ('SuperResK1DWSEK1'): 'in' is 136 but block 3 outputs 134 channels"
            ),
            "{message}"
        );
        let zero = SE_REFERENCE.replacen("'L': 6", "'L': 0", 1);
        assert!(
            error(&zero)
                .contains("'L' must be an integer in 1..=65536, not the integer 0 (at line 5"),
            "{}",
            error(&zero)
        );
        let even = SE_REFERENCE.replacen("'k': 5", "'k': 4", 1);
        assert!(
            error(&even).contains("block 1 ('SuperResK1DWSEK1'): 'k' must be odd"),
            "{}",
            error(&even)
        );
        let stride = SE_REFERENCE.replacen("'s': 1}", "'s': 3}", 1);
        assert!(
            error(&stride).contains("block 1 ('SuperResK1DWSEK1'): 's' must be 1 or 2"),
            "{}",
            error(&stride)
        );
        let extra = SE_REFERENCE.replacen("'k': 3, 'out': 40", "'k': 3, 'g': 1, 'out': 40", 1);
        assert!(
            error(&extra).contains("block 0 ('ConvKXBNRELU'): unknown key \"g\""),
            "{}",
            error(&extra)
        );
        let no_stem =
            "[{'class': 'SuperResK1DWK1', 'in': 3, 'out': 8, 'btn': 8, 'k': 3, 's': 2, 'L': 1}]";
        assert!(
            error(no_stem).contains(
                "block 0 ('SuperResK1DWK1'): 'class' is SuperResK1DWK1 but the first block must be"
            ),
            "{}",
            error(no_stem)
        );
    }

    #[test]
    fn syntax_and_shape_errors_say_where() {
        let broken = SE_REFERENCE.replacen("'s': 2},\n{ 'L': 6", "'s': 2},\n{ 'L': 6]", 1);
        let message = error(&broken);
        assert!(message.contains("malformed TinyNAS structure at line 5, column 9: expected ',' or '}' but found ']'"), "{message}");
        let unclosed = &SE_REFERENCE[..SE_REFERENCE.len() - 1];
        assert!(error(unclosed).contains("at line 9"), "{}", error(unclosed));
        assert!(error("{'best_structures': []}").contains("empty"));
        assert!(error("{'structures': [[]]}").contains("unknown key \"structures\""));
        assert!(error("{'best_structures': [[{'class': 'ConvKXBNRELU', 'in': 3, 'out': 8, 'k': 3, 's': 1}]], 'space_arch': 'Cnn3DNet'}").contains("'space_arch' must be 'CnnNet'"));
        assert!(
            error("[[{'class': 'ConvKXBNRELU', 'in': 3, 'out': 8, 'k': 3}], [{'in': 3}]]")
                .contains("structure 1, block 0: the key 'class' is missing")
        );
        assert!(error("42").contains("not the integer 42"));
    }
}
