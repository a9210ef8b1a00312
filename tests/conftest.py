import os

import pytest
import torch

# Two cores: keep torch from oversubscribing when pytest runs beside other work.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SHORT_FORM_YAML = """\
model:
  vocab_size: 1000
  d_model: 256
  n_heads: 8
  architecture: {n_stacks: 2, blocks_per_stack: 2}
training:
  batch_size: 4
  seq_len: 128
  optimizer: {optimizer_type: AdamW, lr: 1.0e-4}
data: {use_dummy_data: true}
schedule:
  - {start_t: 0.0, end_t: 0.5, name: warmup, optimizer_config: {lr: 1.0e-5}}
  - {start_t: 0.5, end_t: 1.0, name: main,   optimizer_config: {lr: 1.0e-4}}
"""


@pytest.fixture
def short_form_path(tmp_path):
    path = tmp_path / "short.yaml"
    path.write_text(SHORT_FORM_YAML)
    return path


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    # Never write token caches into the user's home during tests; one cache for the session.
    os.environ["STACKWISE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
