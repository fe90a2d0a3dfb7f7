//! End-to-end tests of the `deepmad` binary: real processes, real files, exit codes, and golden
//! files for human-facing text (regenerate with `UPDATE_GOLDEN=1`, then review the diff).

use std::path::PathBuf;
use std::process::{Command, Output};

fn deepmad(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_deepmad"))
        .args(args)
        .output()
        .expect("the deepmad binary runs")
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "exit {:?}, stderr: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).expect("utf-8 output")
}

fn json(args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&stdout(&deepmad(args))).expect("valid JSON output")
}

/// Asserts that a command fails with exit code 2 and a message containing `needle`.
fn assert_bad_input(args: &[&str], needle: &str) {
    let output = deepmad(args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
    assert!(
        stderr.contains(needle),
        "{args:?}: expected {needle:?} in {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

fn check_golden(name: &str, actual: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).expect("golden file written");
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|_| panic!("missing {}; run with UPDATE_GOLDEN=1", path.display()));
    assert_eq!(actual, expected, "output differs from {}", path.display());
}

fn temp_file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("deepmad-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(name);
    std::fs::write(&path, text).expect("temp file written");
    path
}

/// The worked example of issue 2: a result of the paper code's own search at the R18 budget.
const TINYNAS_R18: &str = "{'best_structures': [[
  {'class': 'ConvKXBNRELU', 'in': 3, 'out': 32, 's': 2, 'k': 3},
  {'class': 'SuperResK1KXK1', 'in': 32, 'out': 104, 's': 2, 'k': 3, 'L': 1, 'btn': 32},
  {'class': 'SuperResK1KXK1', 'in': 104, 'out': 416, 's': 2, 'k': 5, 'L': 7, 'btn': 40},
  {'class': 'SuperResK1KXK1', 'in': 416, 'out': 616, 's': 2, 'k': 5, 'L': 12, 'btn': 64},
  {'class': 'SuperResK1KXK1', 'in': 616, 'out': 616, 's': 1, 'k': 5, 'L': 12, 'btn': 64},
  {'class': 'SuperResK1KXK1', 'in': 616, 'out': 2048, 's': 2, 'k': 3, 'L': 1, 'btn': 512},
]], 'space_arch': 'CnnNet'}";

#[test]
fn analyze_resnet50_table_matches_golden() {
    check_golden(
        "analyze_resnet50.txt",
        &stdout(&deepmad(&["analyze", "resnet50"])),
    );
}

#[test]
fn analyze_json_has_the_documented_keys() {
    let value = json(&["analyze", "resnet18", "--json"]);
    for key in [
        "params",
        "flops",
        "layers",
        "effectiveness",
        "entropy",
        "penalty",
        "objective",
        "stages",
    ] {
        assert!(value.get(key).is_some(), "missing {key}");
    }
    assert_eq!(value["params"], 11_689_512);
    assert_eq!(value["layers"], 17);
}

#[test]
fn analyze_reads_tinynas_files_in_both_objectives() {
    let path = temp_file("r18.txt", TINYNAS_R18);
    let path = path.to_str().unwrap();
    let value = json(&["analyze", path, "--objective", "tinynas", "--json"]);
    assert_eq!(value["params"], 10_576_000);
    assert_eq!(value["flops"], 1_818_075_616u64);
    assert_eq!(value["layers"], 100);
    let fitness = value["objective"].as_f64().unwrap();
    assert!(
        (fitness / 29291.463439930158 - 1.0).abs() < 1e-9,
        "{fitness}"
    );
    let paper = json(&["analyze", path, "--json"]);
    assert_eq!(paper["objective_kind"], "paper");
}

#[test]
fn analyze_reads_deepmad_json_written_by_design() {
    let dir = temp_file("placeholder", "");
    let out = dir.with_file_name("design.json");
    let out = out.to_str().unwrap();
    let solved = json(&[
        "design",
        "--block",
        "basic",
        "--params",
        "270K",
        "--flops",
        "41M",
        "--rho",
        "0.5",
        "--resolution",
        "32",
        "--num-classes",
        "100",
        "--format",
        "json",
        "--out",
        out,
    ]);
    let analyzed = json(&["analyze", out, "--json"]);
    assert_eq!(analyzed["content_hash"], solved["content_hash"]);
    assert_eq!(analyzed["objective"], solved["objective"]);
}

#[test]
fn design_json_is_within_budget_and_complete() {
    let value = json(&[
        "design",
        "--block",
        "bottleneck",
        "--params",
        "11.7M",
        "--flops",
        "1.8G",
        "--rho",
        "0.3",
        "--format",
        "json",
    ]);
    for key in [
        "params",
        "flops",
        "layers",
        "effectiveness",
        "entropy",
        "penalty",
        "objective",
        "stages",
        "architecture",
        "solve_ms",
        "certificate",
    ] {
        assert!(value.get(key).is_some(), "missing {key}");
    }
    assert!(value["params"].as_u64().unwrap() <= 11_700_000);
    assert!(value["flops"].as_u64().unwrap() <= 1_800_000_000);
    assert!(value["effectiveness"].as_f64().unwrap() <= 0.3);
}

#[test]
fn design_table_matches_golden() {
    let text = stdout(&deepmad(&[
        "design",
        "--block",
        "mbconv-se",
        "--params",
        "5.3M",
        "--flops",
        "390M",
        "--rho",
        "0.5",
    ]));
    // The solve time varies from run to run; everything else is deterministic.
    let masked: String = text
        .lines()
        .map(|line| match line.strip_prefix("solved in ") {
            Some(rest) => format!("solved in <ms>{}", &rest[rest.find(" ms").unwrap()..]),
            None => line.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    check_golden("design_mbconv_se_b0.txt", &(masked + "\n"));
}

#[test]
fn design_exports_tinynas_format() {
    let text = stdout(&deepmad(&[
        "design",
        "--block",
        "bottleneck",
        "--params",
        "11.7M",
        "--flops",
        "1.8G",
        "--rho",
        "0.3",
        "--objective",
        "tinynas",
        "--format",
        "tinynas",
    ]));
    let nets = deepmad_design::tinynas::TinyNet::parse_all(&text).expect("exported file parses");
    assert_eq!(nets.len(), 1);
    assert_eq!(nets[0].stage_count(), 5);
}

#[test]
fn bad_input_exits_2_with_a_clear_message() {
    let base = [
        "design", "--block", "basic", "--params", "11M", "--flops", "1.8G",
    ];
    let with = |extra: &[&'static str]| -> Vec<&'static str> {
        base.iter().copied().chain(extra.iter().copied()).collect()
    };
    assert_bad_input(&with(&["--rho", "0"]), "rho");
    assert_bad_input(&with(&["--rho", "-1"]), "rho");
    assert_bad_input(&with(&["--rho", "NaN"]), "rho");
    assert_bad_input(&with(&["--rho", "abc"]), "--rho");
    assert_bad_input(&with(&["--rho", "0.3", "--alpha", "1,8"]), "alpha");
    assert_bad_input(
        &["design", "--block", "vgg", "--params", "1M", "--rho", "0.3"],
        "block",
    );
    assert_bad_input(&["design", "--block", "basic", "--rho", "0.3"], "budget");
    assert_bad_input(
        &[
            "design", "--block", "basic", "--params", "lots", "--rho", "0.3",
        ],
        "params",
    );
    assert_bad_input(
        &[
            "design",
            "--block",
            "bottleneck",
            "--params",
            "1K",
            "--rho",
            "0.3",
        ],
        "smallest design",
    );
    assert_bad_input(&["analyze", "vgg16"], "neither a built-in network");
    let broken = temp_file(
        "broken.txt",
        "{'best_structures': [[{'class': 'ConvKXBNRELU', 'in': 3,",
    );
    assert_bad_input(&["analyze", broken.to_str().unwrap()], "broken.txt");
    let wrong = temp_file("wrong.json", "{\"resolution\": 224, \"stages\": 3}");
    assert_bad_input(&["analyze", wrong.to_str().unwrap()], "line 1");
    assert_bad_input(
        &["analyze", "resnet18", "--objective", "tinynas"],
        "TinyNAS",
    );
    assert_bad_input(&["frobnicate"], "unrecognized subcommand");
}

fn repo_file(path: &str) -> String {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    root.join(path).to_string_lossy().into_owned()
}

/// `deepmad bench` measures both kernel sets on a reference design and prints one JSON line
/// each, with the design's parameter count and the phase split.
#[test]
fn bench_measures_both_kernel_sets() {
    let design = repo_file("bench/designs/resnet20.json");
    let args = [
        "bench",
        &design,
        "--batch",
        "2",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--kernels",
        "both",
        "--threads",
        "1",
        "--json",
    ];
    let text = stdout(&deepmad(&args));
    let rows: Vec<serde_json::Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).expect("one JSON object per line"))
        .collect();
    let kernels: Vec<&str> = rows
        .iter()
        .map(|r| r["kernels"].as_str().unwrap())
        .collect();
    assert_eq!(kernels, ["stock", "deepmad"]);
    for row in &rows {
        assert_eq!(row["design"], "resnet20");
        assert_eq!(row["params"], 272_474);
        assert_eq!(row["batch"], 2);
        assert!(row["images_per_s"].as_f64().unwrap() > 0.0, "{row}");
        assert!(row["backward_ms"].as_f64().unwrap() > 0.0, "{row}");
    }
}

/// `deepmad bench --check` compares every deepmad kernel with candle's on the CPU.
#[test]
fn bench_check_passes_on_the_cpu() {
    let text = stdout(&deepmad(&["bench", "--check"]));
    assert!(text.contains("conv 4x24x8x8 -> 24 k3 s1 p1 g24"), "{text}");
    assert!(text.contains("batchnorm running stats"), "{text}");
    assert!(text.contains("activation silu"), "{text}");
    assert!(text.contains("conv 2x16x24x24 -> 24 k1 s1 p0 g1"), "{text}");
    assert!(
        text.contains("conv+bn 4x16x8x8 -> 16 k3 s1 p1 g1 + residual relu"),
        "{text}"
    );
    assert!(text.contains("all 22 checks passed"), "{text}");
}

#[test]
fn bench_bad_input_exits_2() {
    let design = repo_file("bench/designs/resnet20.json");
    assert_bad_input(&["bench"], "name at least one design");
    assert_bad_input(
        &["bench", "no-such-net"],
        "neither a file nor a built-in network",
    );
    assert_bad_input(&["bench", &design, "--kernels", "fast"], "--kernels");
    assert_bad_input(&["bench", &design, "--batch", "0"], "--batch");
    assert_bad_input(&["bench", &design, "--device", "tpu"], "--device");
}

/// The Python that export tests use: `DEEPMAD_TEST_PYTHON`, else `python3`.
fn python() -> String {
    std::env::var("DEEPMAD_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Runs `code` with the test Python; `None` when that Python (or a module it imports) is
/// missing, so the caller can skip with a message.
fn run_python(code: &str) -> Option<String> {
    let output = Command::new(python()).args(["-c", code]).output().ok()?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        if stderr.contains("ModuleNotFoundError") {
            return None;
        }
        panic!("python failed: {stderr}");
    }
    Some(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[test]
fn export_json_and_tinynas() {
    let design = repo_file("bench/designs/resnet20.json");
    let text = stdout(&deepmad(&["export", &design, "--format", "json"]));
    let network = deepmad_design::Network::from_json(text.trim()).expect("IR JSON");
    assert_eq!(text.trim(), network.canonical_json());
    let bottleneck = repo_file("bench/designs/bottleneck.json");
    let tinynas = stdout(&deepmad(&["export", &bottleneck, "--format", "tinynas"]));
    assert!(tinynas.contains("SuperResK1KXK1"), "{tinynas}");
    assert_bad_input(
        &["export", &design, "--format", "tinynas"],
        "cannot be expressed as a TinyNAS structure",
    );
    assert_bad_input(
        &["export", "no-such-net", "--format", "json"],
        "neither a built-in",
    );
}

/// The exported PyTorch file names the design, is valid Python, and (where PyTorch is
/// installed) builds a module with the design's parameter count and exactly the worker's
/// parameter and BatchNorm buffer names.
#[test]
fn export_pytorch_builds_the_workers_network() {
    let dir = tempfile::tempdir().unwrap();
    for (design, params) in [
        (repo_file("bench/designs/resnet20.json"), 272_474u64),
        (repo_file("bench/designs/bottleneck.json"), 599_418),
        (repo_file("bench/designs/mbconv-se.json"), 597_480),
    ] {
        let file = dir.path().join("net.py");
        let file_arg = file.to_string_lossy().into_owned();
        stdout(&deepmad(&[
            "export", &design, "--format", "pytorch", "--out", &file_arg,
        ]));
        let text = std::fs::read_to_string(&file).unwrap();
        let network =
            deepmad_design::Network::from_json(&std::fs::read_to_string(&design).unwrap()).unwrap();
        assert!(text.contains(&network.content_hash()));
        assert!(text.contains(&format!("PARAMS = {params}")));
        let syntax = format!("import ast; ast.parse(open({file_arg:?}).read()); print('ok')");
        let Some(ok) = run_python(&syntax) else {
            eprintln!("skipping: no {} to parse the export with", python());
            return;
        };
        assert_eq!(ok.trim(), "ok");
        let names = format!(
            "import importlib.util, json\n\
             spec = importlib.util.spec_from_file_location('net', {file_arg:?})\n\
             net = importlib.util.module_from_spec(spec); spec.loader.exec_module(net)\n\
             model = net.build_model()\n\
             count = sum(p.numel() for p in model.parameters())\n\
             names = sorted(k for k in model.state_dict() if not k.endswith('num_batches_tracked'))\n\
             print(json.dumps({{'params': count, 'names': names}}))"
        );
        let Some(output) = run_python(&names) else {
            eprintln!(
                "skipping the PyTorch build: PyTorch is not installed for {}",
                python()
            );
            return;
        };
        let value: serde_json::Value = serde_json::from_str(output.trim()).unwrap();
        assert_eq!(value["params"], params);
        let model =
            deepmad_worker::Model::build(&network, 0, 0.1, &candle_core::Device::Cpu).unwrap();
        let expected: Vec<String> = model.named_vars().into_iter().map(|v| v.name).collect();
        let got: Vec<String> = serde_json::from_value(value["names"].clone()).unwrap();
        assert_eq!(got, expected, "{design}");
    }
}

/// Issue 24 (item 9): a sweep file whose recipe every worker would refuse is refused before
/// anything is sent (no coordinator runs here), exit code 2, naming the key.
#[test]
fn sweep_create_refuses_a_bad_recipe() {
    let sweep = "name = \"bad\"\ndataset = \"idx:data/mnist-subset\"\nseeds = [0]\n\
                 [grid]\nblock = [\"basic\"]\nrho = [0.3]\nbudget = [{ params = \"20K\" }]\n\
                 resolution = 28\nnum_classes = 10\n[recipe]\nepochs = 0\n";
    let file = temp_file("epochs-zero.toml", sweep);
    assert_bad_input(
        &["sweep", "create", file.to_str().unwrap()],
        "recipe.epochs: must be between 1 and 10000, got 0",
    );
}
