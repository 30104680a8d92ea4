"""The deployment: the template `make package` generates, and `cai upload` / `cai payload` against moto.

The template tests read .serverless/ as `sls package` left it (`make test` builds it first);
they skip, saying so, only where it has not been built.
"""

import json
import logging
import modulefinder
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / ".serverless" / "cloudformation-template-update-stack.json"
PACKAGE = ROOT / ".serverless" / "cai.zip"
LAYERS = ROOT / "build" / "layers"
ASL = ROOT / "statemachine" / "cai.asl.json"
LAMBDA_UNZIPPED_LIMIT = 250 * 1024 * 1024
HANDLERS = {"initialize": "handlers/initialize.handler",
            "cosmicExecutor": "handlers/cosmic_executor.handler",
            "summarize": "handlers/summarize.handler"}
# the only Allow with Resource "*": CloudWatch Logs delivery for Step Functions logging accepts no other
WILDCARD_RESOURCE_ACTIONS = {"logs:CreateLogDelivery", "logs:GetLogDelivery", "logs:UpdateLogDelivery",
                             "logs:DeleteLogDelivery", "logs:ListLogDeliveries", "logs:PutResourcePolicy",
                             "logs:DescribeResourcePolicies", "logs:DescribeLogGroups"}


@pytest.fixture(scope="module")
def template():
    if not TEMPLATE.is_file():
        pytest.skip(f"{TEMPLATE.relative_to(ROOT)} not built: run `make package` (make test does)")
    return json.loads(TEMPLATE.read_text())


@pytest.fixture(scope="module")
def functions(template):
    """Function key (initialize, ...) -> its Properties."""
    found = {}
    for resource in template["Resources"].values():
        if resource["Type"] == "AWS::Lambda::Function":
            props = resource["Properties"]
            found[props["FunctionName"].rsplit("-", 1)[1]] = props
    return found


def as_list(value):
    return value if isinstance(value, list) else [value]


# --- functions and layers ----------------------------------------------------------------------

def test_template_declares_the_three_functions_and_their_handlers(functions):
    assert {k: f["Handler"] for k, f in functions.items()} == HANDLERS
    for props in functions.values():
        major, minor = map(int, props["Runtime"].removeprefix("python").split("."))
        assert (major, minor) >= (3, 12), "older runtimes run on Amazon Linux 2, which refuses current wheels"
        assert props["Architectures"] == ["x86_64"]
        assert props["Environment"]["Variables"]["LOG_LEVEL"] == "INFO"
    executor = functions["cosmicExecutor"]
    assert executor["MemorySize"] == 10240 and executor["Timeout"] == 900
    assert executor["EphemeralStorage"]["Size"] >= 1024


def test_every_function_gets_the_inference_layer_and_fits_lambdas_limit(template, functions):
    layer = template["Resources"]["InferenceLambdaLayer"]["Properties"]
    zip_name = layer["Content"]["S3Key"].rsplit("/", 1)[1]
    assert zip_name == "inference-py3.12-x86_64.zip"
    for props in functions.values():
        assert props["Layers"] == [{"Ref": "InferenceLambdaLayer"}]

    manifest = json.loads((LAYERS / zip_name.replace(".zip", ".json")).read_text())
    with zipfile.ZipFile(LAYERS / zip_name) as zf:
        layer_bytes = sum(i.file_size for i in zf.infolist())
        names = zf.namelist()
    assert layer_bytes == manifest["zip"]["unzipped_bytes"]
    assert {"python/numpy/__init__.py", "python/onnxruntime/__init__.py", "python/safetensors/__init__.py"} <= set(names)
    with zipfile.ZipFile(PACKAGE) as zf:
        package_bytes = sum(i.file_size for i in zf.infolist())
    # the limit counts a function's package and all its layers, unzipped
    assert layer_bytes + package_bytes < LAMBDA_UNZIPPED_LIMIT


def test_function_package_holds_the_handlers_and_the_core_they_reach(tmp_path):
    if not PACKAGE.is_file():
        pytest.skip("run `make package` first")
    with zipfile.ZipFile(PACKAGE) as zf:
        names = zf.namelist()
        zf.extractall(tmp_path)
    # requirements.txt and .completed_requirements are serverless-python-requirements' markers (no packages)
    assert all(n.startswith(("handlers/", "cai/")) or n in ("requirements.txt", ".completed_requirements")
               for n in names), names
    assert not any(n.startswith(("cai/commands/", "cai/cli.py", "cai/deploy.py", "cai/backends/local.py"))
                   for n in names)

    # every cai module the handlers can import (at any depth, lazy imports included) was packaged
    finder = modulefinder.ModuleFinder(path=[str(tmp_path)])
    for handler in ("initialize", "cosmic_executor", "summarize"):
        finder.run_script(str(tmp_path / "handlers" / f"{handler}.py"))
    missing = [m for m in finder.badmodules if m.startswith("cai.") or m == "cai"]
    assert not missing, f"the handlers import {missing}, which the package lacks"


# --- state machine -----------------------------------------------------------------------------

def without_default_query_language(node):
    if isinstance(node, dict):
        return {k: without_default_query_language(v) for k, v in node.items()
                if (k, v) != ("QueryLanguage", "JSONPath")}
    if isinstance(node, list):
        return [without_default_query_language(v) for v in node]
    return node


def test_state_machine_is_the_asl_file_with_a_distributed_map(template):
    machine = template["Resources"]["CaiStateMachine"]["Properties"]
    definition = json.loads(machine["DefinitionString"])
    # the file the emulated backend runs, unchanged but for the default query language the plugin spells out
    assert without_default_query_language(definition) == json.loads(ASL.read_text())
    placeholders = set(re.findall(r"\$\{(\w+)\}", machine["DefinitionString"]))
    assert placeholders == set(machine["DefinitionSubstitutions"])

    executors = definition["States"]["Executors"]
    assert executors["ItemProcessor"]["ProcessorConfig"] == {"Mode": "DISTRIBUTED", "ExecutionType": "STANDARD"}
    reader = executors["ItemReader"]
    assert reader["Resource"] == "arn:aws:states:::s3:getObject" and reader["ReaderConfig"]["InputType"] == "JSON"
    assert machine["StateMachineType"] == "STANDARD"
    assert machine["StateMachineName"] == "cai-dev"
    # 10,000 children's outputs do not fit a 256 KiB state: the Map writes them to the stack's bucket
    assert executors["ResultWriter"] == {"Resource": "arn:aws:states:::s3:putObject",
                                         "Parameters": {"Bucket": "${CaiBucketName}", "Prefix": "map-runs"}}
    assert machine["DefinitionSubstitutions"]["CaiBucketName"] == template["Outputs"]["BucketName"]["Value"]
    assert executors["ResultPath"] is None


def test_outputs_name_what_cai_and_sls_invoke_read(template):
    outputs = template["Outputs"]
    assert outputs["StateMachineArn"]["Value"] == {"Ref": "CaiStateMachine"}  # cai run --backend aws
    assert outputs["CaiStateMachineArn"]["Value"] == {"Ref": "CaiStateMachine"}  # sls invoke stepf --name cai
    assert outputs["BucketName"]["Value"] == {"Fn::If": ["CreateBucket", {"Ref": "CaiBucket"},
                                                         {"Ref": "ExistingBucketName"}]}


# --- bucket, IAM, logs -------------------------------------------------------------------------

def test_bucket_is_encrypted_private_and_tls_only(template):
    resources = template["Resources"]
    bucket = resources["CaiBucket"]
    assert bucket["Condition"] == "CreateBucket"  # an existing bucket by parameter instead
    props = bucket["Properties"]
    assert props["BucketEncryption"]["ServerSideEncryptionConfiguration"][0]["ServerSideEncryptionByDefault"]
    assert all(props["PublicAccessBlockConfiguration"].values())
    (deny,) = resources["CaiBucketPolicy"]["Properties"]["PolicyDocument"]["Statement"]
    assert deny["Effect"] == "Deny" and deny["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    assert template["Parameters"]["ExistingBucketName"]["Default"] == ""


def iam_statements(template):
    for name, resource in template["Resources"].items():
        if resource["Type"] == "AWS::IAM::Role":
            assert "ManagedPolicyArns" not in resource["Properties"], name
            for policy in resource["Properties"].get("Policies", []):
                for statement in policy["PolicyDocument"]["Statement"]:
                    yield name, statement
        elif resource["Type"] == "AWS::IAM::Policy":
            for statement in resource["Properties"]["PolicyDocument"]["Statement"]:
                yield name, statement


def test_no_iam_statement_grants_wildcards_beyond_what_the_service_requires(template):
    statements = list(iam_statements(template))
    assert len(statements) >= 8
    for role, statement in statements:
        assert statement["Effect"] == "Allow"
        actions = as_list(statement["Action"])
        assert not any(a == "*" or a.endswith(":*") for a in actions), (role, statement)
        if "*" in as_list(statement["Resource"]):
            assert set(actions) <= WILDCARD_RESOURCE_ACTIONS, (role, statement)
        assert not any(str(r).endswith(":::*") for r in as_list(statement["Resource"])), (role, statement)
    # the Map's ResultWriter may write its own prefix of the bucket, nothing else
    [writer] = [s for _, s in statements if s.get("Sid") == "WriteMapRunResults"]
    assert "s3:PutObject" in writer["Action"] and "/map-runs/*" in json.dumps(writer["Resource"])


def test_logs_are_kept_for_the_retention_parameter(template):
    groups = {k: r["Properties"] for k, r in template["Resources"].items() if r["Type"] == "AWS::Logs::LogGroup"}
    assert {"InitializeLogGroup", "CosmicExecutorLogGroup", "SummarizeLogGroup", "CaiStateMachineLogGroup"} <= set(groups)
    assert all(g["RetentionInDays"] == 30 for g in groups.values())


def test_template_names_no_account_bucket_or_region(template):
    text = TEMPLATE.read_text()
    assert not re.search(r"(?<![\d.])\d{12}(?![\d.])", text), "an AWS account id"
    assert "us-east-1" not in json.dumps(template["Resources"])
    assert not re.search(r"arn:aws:s3:::[a-z0-9]", text), "a bucket by name"


# --- cai upload / cai payload against moto -----------------------------------------------------

@pytest.fixture
def stack(monkeypatch):
    """A moto account with a stack whose outputs name a bucket, as `sls deploy` leaves it."""
    boto3 = pytest.importorskip("boto3")
    from moto import mock_aws

    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "eu-west-1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    with mock_aws():
        body = {"Resources": {"CaiBucket": {"Type": "AWS::S3::Bucket", "Properties": {"BucketName": "cai-data"}}},
                "Outputs": {"BucketName": {"Value": {"Ref": "CaiBucket"}},
                            "StateMachineArn": {"Value": "arn:aws:states:eu-west-1:000000000000:stateMachine:cai-dev"}}}
        boto3.client("cloudformation").create_stack(StackName="cai-dev", TemplateBody=json.dumps(body))
        yield boto3.client("s3")


@pytest.fixture(scope="module")
def partitions(tmp_path_factory, request):
    from cai.partitions import write_partitions
    from cai.store import LocalStore

    folder = tmp_path_factory.mktemp("parts")
    with np.load(request.config.rootpath / "data" / "sdss_dr17_galaxies_32x32.npz") as npz:
        images, mags = npz["images"][:60], npz["aperture_mag"][:60]
    src = folder.parent / "survey.npz"
    np.savez(src, images=images, magnitudes=mags, redshifts=np.full(60, 0.1, np.float32),
             object_id=np.arange(60))
    write_partitions([str(src)], LocalStore(folder), "", size_mb=0, galaxies_per_part=20)
    return folder


def keys(s3, prefix=""):
    return sorted(o["Key"] for o in s3.list_objects_v2(Bucket="cai-data", Prefix=prefix).get("Contents", []))


def test_upload_puts_partitions_and_model_in_the_stacks_bucket(stack, partitions, onnx_model, tmp_path):
    from cai.cli import main

    assert main(["upload", str(partitions), str(onnx_model), "--stack", "cai-dev", "--prefix", "surveys/a"]) == 0
    from cai.model.weights import file_sha256

    uploaded = keys(stack)
    model_key = f"models/{file_sha256(onnx_model)[:16]}/{onnx_model.name}"
    assert model_key in uploaded
    assert [k for k in uploaded if k.startswith("surveys/a/")] == \
        sorted(f"surveys/a/{p.name}" for p in partitions.iterdir())
    assert main(["upload", str(onnx_model), "--stack", "cai-dev"]) == 0  # a model alone keeps the data's record
    last = json.loads(stack.get_object(Bucket="cai-data", Key="uploads/last.json")["Body"].read())
    assert last == {"partition_prefix": "surveys/a/", "model_key": model_key}

    # other weights under the same file name: a new key, never the stale model
    changed = tmp_path / onnx_model.name
    changed.write_bytes(onnx_model.read_bytes() + b"\0")
    assert main(["upload", str(changed), "--stack", "cai-dev"]) == 0
    last = json.loads(stack.get_object(Bucket="cai-data", Key="uploads/last.json")["Body"].read())
    assert last["model_key"] != model_key and last["model_key"].endswith(f"/{onnx_model.name}")
    assert stack.get_object(Bucket="cai-data", Key=last["model_key"])["Body"].read() == changed.read_bytes()


def test_upload_failures_and_a_missing_stack_are_named_errors(stack, onnx_model, monkeypatch):
    from cai.backends.aws import stack_outputs
    from cai.errors import CaiError, StoreError
    from cai.store import S3Store

    with pytest.raises(StoreError, match=r"cannot upload .* to s3://no-such-bucket/models/m.onnx: NoSuchBucket"):
        S3Store("no-such-bucket", stack).upload(onnx_model, "models/m.onnx")
    with pytest.raises(CaiError, match=r"cannot read stack 'cai-prod'.*npx sls deploy"):
        stack_outputs("cai-prod")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(CaiError, match=r"Unable to locate credentials.*aws configure"):
        stack_outputs("cai-dev")


def test_payload_is_what_initialize_accepts_for_the_uploaded_data(stack, partitions, onnx_model, tmp_path):
    from cai import deploy, pipeline
    from cai.cli import main
    from cai.store import S3Store

    done = deploy.upload([str(partitions), str(onnx_model)], "cai-dev")
    out = tmp_path / "payload.json"
    # the keys default to what the last upload put in the bucket
    assert main(["payload", "--stack", "cai-dev", "--batch-size", "64", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["partition_prefix"] == done["partition_prefix"] and payload["model_key"] == done["model_keys"][0]
    assert payload["bucket"] == "cai-data" and payload["batch_size"] == 64
    assert payload["result_prefix"].startswith("runs/") and payload["result_prefix"].endswith("/")
    assert "runtime" not in payload  # unset settings take Initialize's defaults

    plan = pipeline.initialize(payload, S3Store("cai-data", stack))
    assert plan["partitions"] == 3 and plan["galaxies"] == 60


def test_payload_names_every_missing_input_before_anything_runs(stack, tmp_path):
    from cai import deploy
    from cai.errors import InputError, PayloadError

    with pytest.raises(InputError, match="no --partition-prefix or --model-key given"):
        deploy.payload("cai-dev")  # nothing uploaded yet
    with pytest.raises(PayloadError) as err:
        deploy.payload("cai-dev", "nowhere/", "models/none.onnx", settings={"batch_size": 0})
    assert "'batch_size' must be an integer" in str(err.value)
    with pytest.raises(PayloadError) as err:
        deploy.payload("cai-dev", "nowhere/", "models/none.onnx")
    assert "no partitions" in str(err.value) and "no model" in str(err.value)
    body, count = deploy.payload("cai-dev", "nowhere/", "models/none.onnx", check=False, bucket="other")
    assert body["bucket"] == "other" and count is None


# --- executor logs, as CloudWatch gets them ----------------------------------------------------

class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)


def test_executor_logs_one_json_line_per_partition_at_log_level(partitions, onnx_model, tmp_path, monkeypatch):
    """On Lambda the runtime's root handler writes to CloudWatch; LOG_LEVEL must let the events through."""
    from cai.store import LocalStore
    from handlers import cosmic_executor

    store = LocalStore(tmp_path)
    for path in partitions.iterdir():
        store.put(f"parts/{path.name}", path.read_bytes())
    store.put("parts/part-broken.safetensors", b"not a partition")
    root, lines = logging.getLogger(), Lines()
    monkeypatch.setattr(root, "level", logging.WARNING)  # the runtime's default
    monkeypatch.setattr(logging.getLogger("cai"), "level", logging.NOTSET)
    monkeypatch.setattr(logging.getLogger("cai.events"), "level", logging.NOTSET)  # cai.cli quiets it
    root.addHandler(lines)
    monkeypatch.setenv("LOG_LEVEL", "INFO")
    run = {"run_id": "r1", "bucket": str(tmp_path), "partition_prefix": "parts/", "model_key": str(onnx_model),
           "result_prefix": "runs/r1/", "batch_size": 64, "runtime": "onnxruntime", "threads": 1}
    item = {"executor": 0, "partitions": [{"key": "parts/part-00001.safetensors"},
                                          {"key": "parts/part-broken.safetensors"}]}
    try:
        result = cosmic_executor.handler({"run": run, "item": item}, None)
    finally:
        root.removeHandler(lines)

    assert result["ok"] == 1 and result["failed"] == ["parts/part-broken.safetensors"]
    events = [json.loads(r.getMessage()) for r in lines.records if r.name == "cai.events"]
    ok, bad = [e for e in events if e["event"] == "partition"]
    assert ok["run_id"] == "r1" and ok["partition"] == "parts/part-00001.safetensors" and ok["galaxies"] == 20
    assert set(ok["seconds"]) == {"download", "decode", "inference", "write", "total"} and ok["peak_memory_mb"] > 0
    assert bad["status"] == "failed" and bad["partition"] == "parts/part-broken.safetensors" and bad["reason"]
    assert [r.levelno for r in lines.records if r.name == "cai.events"] == [logging.INFO, logging.ERROR]
