"""The model as an MLflow model: logged by evaluate, loaded by pyfunc, registered, fetched and served by MLflow.

One tiny project per module (test_stage_evaluate's), on a copy of a migrated sqlite store: the
evaluated run has a model; a second run has a model and a lower bits per byte; a third the
lowest of all but no model, so `--best` must pass it over.
"""

import json
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from conftest import free_port, stop_process_group, tool_env, wait_for_http
from test_stage_evaluate import PARAMS, _pretrain_run, _run, make_project

from nanollm.checkpoint import load_model
from nanollm.config import EvalConfig, TrackingConfig
from nanollm.errors import NanollmError
from nanollm.hardware import pick_device
from nanollm.inference.generate import generate
from nanollm.tokenizer import load_tokenizer
from nanollm.tracking import models as tracking_models
from nanollm.tracking.models import fetch_model
from nanollm.tracking.runs import make_tracker
from stages.cli import cli

LOGGED = {**PARAMS, "tracking": {**PARAMS["tracking"], "log_model": True}}
GREEDY = {"temperature": 0.0, "max_tokens": 10}


@pytest.fixture(scope="module")
def project(tmp_path_factory, empty_store):
    root = tmp_path_factory.mktemp("register")
    uri = f"sqlite:///{root}/mlflow.db"
    shutil.copy(empty_store, root / "mlflow.db")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.delenv("DVC_ROOT", raising=False)
        mp.delenv("DVC_EXP_NAME", raising=False)
        torch.set_num_threads(1)  # the served model runs with one thread too: the same float sums, the same argmax
        make_project(root)
        evaluated = _pretrain_run(root)
        result = _run(root, LOGGED)
        assert result.exit_code == 0, result.output
        bpb = json.loads((root / "metrics" / "evaluate.json").read_text())["bits_per_byte"]
        better = _run_with(root, bpb - 1.0, log_model=True)
        unlogged = _run_with(root, bpb - 2.0, log_model=False)
        yield SimpleNamespace(root=root, uri=uri, evaluated=evaluated, better=better, unlogged=unlogged)


def _run_with(root, bits_per_byte, *, log_model):
    """Another run of the experiment with this eval/bits_per_byte, the project's model logged or not."""
    tracker = make_tracker(TrackingConfig(experiment="stage-test"), root)
    tracker.start(run_name=f"bpb {bits_per_byte:.2f}")
    tracker.log_metrics({"eval/bits_per_byte": bits_per_byte})
    if log_model:
        tokenizer = root / "data" / "tokenizer" / "tokenizer.json"
        tracking_models.log_model(tracker, root / "models" / "checkpoint", tokenizer, sampling=EvalConfig(), seed=0)
    tracker.end()
    return tracker.run_id


def _register(*args):
    return CliRunner().invoke(cli, ["--params", "params.yaml", "register", *args], catch_exceptions=False)


@pytest.fixture(scope="module")
def champion(project):
    """`nanollm register --run-id <evaluated run>`: the alias champion on its model."""
    return _register("--run-id", project.evaluated, "--alias", "champion")


def _greedy(root, prompt, max_tokens):
    """What nanollm.inference.generate writes after `prompt` with the project's checkpoint, greedy, on the
    device the served model picks (auto): the same kernels, so the same argmax even at a near tie."""
    tok = load_tokenizer(root / "data" / "tokenizer")
    model = load_model(root / "models" / "checkpoint", device=pick_device("auto"))
    model.pack_for_decode()
    ids = generate(model, [tok.eot_id, *tok.encode(prompt)], max_tokens, temperature=0.0, stop_id=tok.eot_id)
    return tok.decode(list(ids))


def test_evaluate_logs_a_pyfunc_with_a_signature_and_the_eval_sampling_as_defaults(project):
    import mlflow

    info = mlflow.models.get_model_info(f"runs:/{project.evaluated}/model")
    assert info.flavors["python_function"]["loader_module"] == "nanollm.inference.pyfunc"
    assert info.signature.inputs.input_names() == ["prompt"]
    defaults = {p.name: p.default for p in info.signature.params.params}
    # params.yaml's eval section and seed: the settings that wrote reports/samples.txt
    assert defaults == {"max_tokens": 12, "temperature": 0.9, "top_k": 20, "top_p": 1.0, "seed": 3}
    assert info.saved_input_example_info["serving_input_path"]  # an example request beside the model


def test_the_loaded_model_completes_prompts_as_generate_does(project):
    import mlflow

    model = mlflow.pyfunc.load_model(f"runs:/{project.evaluated}/model")
    prompts = ["def ", "", "class Parser:\n"]
    out = model.predict(pd.DataFrame({"prompt": prompts}), params=GREEDY)
    assert out == [_greedy(project.root, prompt, 10) for prompt in prompts]
    assert len(set(out)) > 1  # the prompts matter

    sampled = {"temperature": 1.0, "max_tokens": 10, "seed": 5}
    first = model.predict(pd.DataFrame({"prompt": ["def ", "def "]}), params=sampled)
    assert first[0] == first[1]  # a row's text does not depend on the rows beside it
    assert model.predict(pd.DataFrame({"prompt": ["def "]}), params=sampled) == first[:1]
    with pytest.raises(ValueError, match="temperature is -1.0; use 0"):
        model.predict(pd.DataFrame({"prompt": ["def "]}), params={"temperature": -1.0})


def test_register_by_run_id_points_the_alias_at_that_runs_model(project, champion):
    from mlflow.tracking import MlflowClient

    assert champion.exit_code == 0, champion.output
    version = MlflowClient(project.uri).get_model_version_by_alias("nanollm", "champion")
    assert version.run_id == project.evaluated
    assert champion.stdout.splitlines() == [
        f"registered run {project.evaluated} as nanollm version {version.version}",
        "models:/nanollm@champion",
    ]


def test_register_best_takes_the_lowest_metric_among_runs_with_a_model(project):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(project.uri)
    assert _register("--best", "eval/bits_per_byte", "--alias", "best").exit_code == 0
    assert client.get_model_version_by_alias("nanollm", "best").run_id == project.better  # not the unlogged run
    assert _register("--best", "eval/bits_per_byte", "--maximize", "--alias", "worst", "--name", "other").exit_code == 0
    assert client.get_model_version_by_alias("other", "worst").run_id == project.evaluated

    typo = _register("--best", "eval/bits_per_bite")
    assert typo.exit_code == 1
    assert typo.stderr.strip().splitlines() == [
        "Error: --best eval/bits_per_bite: none of the 2 run(s) with a model in experiment 'stage-test' has that "
        "metric; did you mean 'eval/bits_per_byte'?"
    ]


def test_register_refuses_a_run_without_a_model_and_an_unknown_run(project):
    refused = _register("--run-id", project.unlogged)
    assert refused.exit_code == 1
    (line,) = refused.stderr.strip().splitlines()
    assert project.unlogged in line and "set tracking.log_model: true" in line and "re-run evaluate" in line
    unknown = _register("--run-id", "0" * 32)
    assert unknown.exit_code == 1
    (line,) = unknown.stderr.strip().splitlines()
    assert "0" * 32 in line and "is not in" in line
    assert _register().exit_code == 2  # neither --run-id nor --best
    reserved = _register("--run-id", project.evaluated, "--alias", "latest")
    assert reserved.exit_code == 1 and reserved.stderr.strip().splitlines()[-1].endswith("pick another --alias")
    assert "Traceback" not in refused.output + unknown.output


def test_fetch_model_downloads_the_checkpoint_and_tokenizer_an_alias_names(project, champion, tmp_path):
    checkpoint, tokenizer = fetch_model("models:/nanollm@champion", project.uri, tmp_path / "fetched")
    source = project.root / "models" / "checkpoint"
    assert sorted(p.name for p in checkpoint.iterdir()) == ["architecture.json", "config.json", "model.pt"]
    assert (checkpoint / "model.pt").read_bytes() == (source / "model.pt").read_bytes()
    assert load_tokenizer(tokenizer).sha256 == load_tokenizer(project.root / "data" / "tokenizer").sha256
    assert load_model(checkpoint).cfg == load_model(source).cfg
    assert json.loads((checkpoint.parent / "sampling.json").read_text())["seed"] == 3

    again = fetch_model(f"runs:/{project.better}/model", project.uri, tmp_path / "fetched")  # replaces the folder
    assert again == (checkpoint, tokenizer) and checkpoint.is_dir()
    with pytest.raises(NanollmError, match="models:/nanollm@nobody cannot be fetched") as err:
        fetch_model("models:/nanollm@nobody", project.uri, tmp_path / "fetched")
    assert "\n" not in str(err.value)
    assert (checkpoint / "model.pt").is_file()  # a failed fetch leaves the previous one


def test_mlflow_models_serve_answers_from_the_registry(project, champion, tmp_path):
    """MLflow's own server, outside the repo, with only the installed nanollm to load the model."""
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/nanollm@champion"]
    command += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    env = tool_env(MLFLOW_TRACKING_URI=project.uri, OMP_NUM_THREADS="1")
    with open(tmp_path / "serve.log", "wb") as log:
        server = subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", server, tmp_path / "serve.log")
        body = {"dataframe_records": [{"prompt": "def "}, {"prompt": "class Parser:\n"}], "params": GREEDY}
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
        assert answer == {"predictions": [_greedy(project.root, p, 10) for p in ("def ", "class Parser:\n")]}
    finally:
        stop_process_group(server, grace_s=15)


# Run with `python -S`: no site-packages on the path, so no .pth file ran, and nanollm's editable
# install is one (a finder a .pth installs). The packages' folder goes back on the path by hand, and
# once mlflow is imported, an import finder refuses every installed package that the model's
# requirements do not bring.
_ONLY_THE_REQUIREMENTS = r"""
import importlib.metadata, importlib.util, json, os, re, sys
sys.path = [p for p in sys.path if p not in ("", os.getcwd())] + json.loads(os.environ["SITE_DIRS"])
assert importlib.util.find_spec("nanollm") is None, "nanollm is importable before the model is loaded"
allowed = set(json.loads(os.environ["ALLOWED_DISTRIBUTIONS"]))
owners = importlib.metadata.packages_distributions()
blocked = {top for top, dists in owners.items() if top != "nanollm"
           and not {re.sub(r"[-_.]+", "-", d).lower() for d in dists} & allowed}

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in blocked:
            raise ModuleNotFoundError(f"{name} is not among the model's requirements", name=name)  # as if absent
        return None

import mlflow  # what MLflow itself imports is mlflow's business (its metadata misses some: anyio's sniffio)
import pandas as pd
sys.meta_path.insert(0, Refuse())
model = mlflow.pyfunc.load_model(sys.argv[1])
import nanollm
prompts, params = json.loads(sys.argv[2]), json.loads(sys.argv[3])
predictions = model.predict(pd.DataFrame({"prompt": prompts}), params=params)
print(json.dumps({"nanollm": nanollm.__file__, "predictions": predictions}))
"""


def test_the_registered_model_loads_and_predicts_with_its_requirements_alone(project, champion, tmp_path):
    """The model carries nanollm's code (code/nanollm). Loaded in an interpreter that cannot import the
    installed nanollm, nor any package its requirements do not bring, it completes prompts as
    `nanollm generate --temperature 0` does."""
    import site

    import mlflow.artifacts

    folder = mlflow.artifacts.download_artifacts("models:/nanollm@champion", dst_path=str(tmp_path / "model"))
    names = {line.split("==")[0] for line in (Path(folder) / "requirements.txt").read_text().split()}
    prompts = ["def ", "class Parser:\n"]
    env = tool_env(
        MLFLOW_TRACKING_URI=project.uri,
        OMP_NUM_THREADS="1",
        SITE_DIRS=json.dumps(site.getsitepackages()),
        ALLOWED_DISTRIBUTIONS=json.dumps(sorted(_with_dependencies(names))),
    )
    env.pop("PYTHONPATH", None)
    command = [sys.executable, "-S", "-c", _ONLY_THE_REQUIREMENTS, "models:/nanollm@champion", json.dumps(prompts)]
    done = subprocess.run(
        [*command, json.dumps(GREEDY)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    repository = Path(__file__).resolve().parents[1]
    assert "/code/nanollm/" in answer["nanollm"] and not answer["nanollm"].startswith(str(repository))  # the model's

    for prompt, predicted in zip(prompts, answer["predictions"], strict=True):
        generated = CliRunner().invoke(
            cli,
            ["--params", str(project.root / "params.yaml"), "generate", "--prompt", prompt, "--temperature", "0",
             "--max-new-tokens", "10", "--threads", "1", "--checkpoint", str(project.root / "models" / "checkpoint"),
             "--tokenizer", str(project.root / "data" / "tokenizer")],
            catch_exceptions=False,
        )  # fmt: skip
        assert generated.exit_code == 0, generated.output
        assert generated.stdout == prompt + predicted + "\n"


def test_the_models_requirements_name_no_nanollm_and_pin_what_logged_it(project, tmp_path):
    """requirements.txt, conda.yaml and python_env.yaml list the same pins, each at the installed version
    as PyPI names it, and never a package called nanollm: the public index has an unrelated one."""
    import importlib.metadata as md

    import mlflow.artifacts
    import yaml

    folder = Path(mlflow.artifacts.download_artifacts(f"runs:/{project.evaluated}/model", dst_path=str(tmp_path)))
    requirements = (folder / "requirements.txt").read_text().split()
    conda = yaml.safe_load((folder / "conda.yaml").read_text())
    pip_in_conda = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    python_env = yaml.safe_load((folder / "python_env.yaml").read_text())
    env_requirements = (folder / python_env["dependencies"][-1].removeprefix("-r ")).read_text().split()
    for listed in (requirements, [r for r in pip_in_conda if "==" in r], env_requirements):
        assert sorted(listed) == sorted(tracking_models.pip_requirements())
    every_entry = [*requirements, *map(str, conda["dependencies"]), *pip_in_conda, *env_requirements]
    assert not any("nanollm" in entry.lower() for entry in every_entry)
    for requirement in requirements:  # no +cpu local tag: PyPI has none
        name, pinned = requirement.split("==")
        assert md.version(name).split("+")[0] == pinned
    assert (folder / "code" / "nanollm" / "inference" / "pyfunc.py").is_file()  # the loader travels with it
    assert not list((folder / "code").rglob("__pycache__"))


def _canonical(name: str) -> str:
    import re

    return re.sub(r"[-_.]+", "-", name).lower()


def _with_dependencies(names: set[str]) -> set[str]:
    """Installed distributions `names` bring, transitively (their required, non-extra dependencies)."""
    import importlib.metadata as md
    import re

    seen: set[str] = set()
    todo = [_canonical(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for line in requires:
            if "extra ==" in line:
                continue
            todo.append(_canonical(re.split(r"[\s;<>=!~\[(]", line, maxsplit=1)[0]))
    return seen
