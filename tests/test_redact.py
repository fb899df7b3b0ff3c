"""Secret redaction (SPEC section 8): which keys are secret and how values are masked."""

from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trainkit_tracking._core.redact import MASK, is_secret_key, redact, redact_value

SECRET_KEYS = [
    # SPEC section 8's examples.
    "hf_token",
    "db_password",
    "AZURE_CLIENT_SECRET",
    "MLFLOW_TRACKING_TOKEN",
    # Each secret word, with each separator and camelCase.
    "token",
    "TOKEN",
    "secret",
    "user.password",
    "db-passwd",
    "service/apikey",
    "azure_credential",
    "gcp.credentials",
    "blob_sas",
    "sasUrl",
    "hfToken",
    "HFToken",
    "mlflowTrackingToken",
    "clientSecretValue",
    "token2",
    # Contains api_key / access_key / private_key, in any case and separator.
    "api_key",
    "OPENAI_API_KEY",
    "apiKey",
    "ApiKey",
    "api-key",
    "x-api-key",
    "service.api.key",
    "myapikey",
    "aws_secret_access_key",
    "storageAccessKey",
    "access-key",
    "ssh_private_key",
    "privateKeyPath",
    "PRIVATE_KEY_PEM",
]

PUBLIC_KEYS = [
    # SPEC section 8's examples: every HF config has them.
    "pad_token_id",
    "max_new_tokens",
    "tokenizer_name",
    # The last word is metadata about the secret.
    "eos_token_id",
    "bos_token_ids",
    "token_size",
    "token_len",
    "max_token_length",
    "hf_token_count",
    "credential_type",
    "secret_name",
    "AWS_ACCESS_KEY_ID",
    "api_key_name",
    "apiKeyId",
    "tokenId",
    # No secret word at all.
    "",
    "learning_rate",
    "model_name_or_path",
    "tokenizer",
    "num_tokens",
    "tokens",
    "keyword",
    "key",
    "code.run_key_hash",
    "code.lineage.parent_training_run_id",
    "mlflow.parentRunId",
    "mlflow.runName",
    "passage",
    "saskatoon_site",
    "secretary",
    "tokenization.strategy",
    "monkey",
]


@pytest.mark.parametrize("key", SECRET_KEYS)
def test_secret_keys(key: str) -> None:
    assert is_secret_key(key)
    assert redact(key, "hunter2") == MASK


@pytest.mark.parametrize("key", PUBLIC_KEYS)
def test_public_keys(key: str) -> None:
    assert not is_secret_key(key)
    assert redact(key, "hunter2") == "hunter2"


def test_secret_key_masks_even_empty_and_masked_values() -> None:
    assert redact("hf_token", "") == MASK
    assert redact("hf_token", MASK) == MASK


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("https://user:pass@host", "https://***@host"),
        ("https://user:pass@host/path?q=1", "https://***@host/path?q=1"),
        ("http://token@github.example/org/repo.git", "http://***@github.example/org/repo.git"),
        ("postgresql://mlflow:s3cr3t@db:5432/mlflow", "postgresql://***@db:5432/mlflow"),
        ("postgresql+psycopg2://u:p@ss@db/x", "postgresql+psycopg2://***@db/x"),
        ("see https://u:p@a.example and https://v:q@b.example", "see https://***@a.example and https://***@b.example"),
        ("git+https://u:p@host/r.git", "git+https://***@host/r.git"),
    ],
)  # fmt: skip
def test_url_credentials_are_masked(value: str, expected: str) -> None:
    assert redact_value(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "https://host/path",
        "https://host/path?email=someone@example.org",
        "https://host?x=a@b",
        "azureml://westeurope.api.azureml.ms/mlflow/v1.0/subscriptions/x",
        "sqlite:////tmp/mlruns/mlflow.db",
        "someone@example.org",
        "git@github.example:org/repo.git",
    ],
)
def test_urls_without_credentials_are_unchanged(value: str) -> None:
    assert redact_value(value) == value


SAS_URL = (
    "https://acct.blob.core.windows.net/container/model.onnx"
    "?sv=2022-11-02&ss=b&srt=co&sp=rl&se=2025-01-01T00:00:00Z&st=2024-01-01T00:00:00Z"
    "&spr=https&sig=AbCd%2Bef%3D&skoid=1&sktid=2&skt=3&ske=4&sks=b&skv=5&sr=b"
)


def test_sas_url_parameters_are_masked() -> None:
    masked = redact_value(SAS_URL)
    assert masked.startswith("https://acct.blob.core.windows.net/container/model.onnx?")
    query = masked.split("?", 1)[1]
    params = dict(pair.split("=", 1) for pair in query.split("&"))
    assert set(params) == {
        "sv", "ss", "srt", "sp", "se", "st", "spr", "sig",
        "skoid", "sktid", "skt", "ske", "sks", "skv", "sr",
    }  # fmt: skip
    assert set(params.values()) == {MASK}
    assert "AbCd" not in masked


def test_sas_masks_only_sas_params_in_a_query() -> None:
    value = "https://host/c?sig=abc&comp=list&restype=container"
    assert redact_value(value) == "https://host/c?sig=***&comp=list&restype=container"


def test_bare_sas_token_is_masked() -> None:
    assert redact_value("sv=2022-11-02&sp=r&sig=abc%3D") == "sv=***&sp=***&sig=***"


@pytest.mark.parametrize(
    "value",
    ["se=0.03 on fold 2", "time sp=3", "st=ok", "ss=4 sv=5"],
)
def test_short_sas_names_outside_a_query_are_left_alone(value: str) -> None:
    assert redact_value(value) == value


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Bearer eyJabc.def-ghi", "Bearer ***"),
        ("bearer abc123", "bearer ***"),
        ("sent header Bearer abc123 to host", "sent header Bearer *** to host"),
        ("Authorization: Bearer abc123", "Authorization: ***"),
        ("authorization=Basic dXNlcjpwYXNz", "authorization=***"),
        ('curl -H "Authorization: token ghx" url', 'curl -H "Authorization: ***" url'),
        ("{'Authorization': 'Basic dXNl', 'A': 1}", "{'Authorization': '***', 'A': 1}"),
        ("Proxy-Authorization: Negotiate abc\nnext line", "Proxy-Authorization: ***\nnext line"),
    ],
)  # fmt: skip
def test_bearer_and_authorization_are_masked(value: str, expected: str) -> None:
    assert redact_value(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("hf_token=abc123 lr=0.1", "hf_token=*** lr=0.1"),
        ("--hf-token=abc123", "--hf-token=***"),
        ('{"hf_token": "abc 123", "pad_token_id": 0}', '{"hf_token": "***", "pad_token_id": 0}'),
        ("db_password: hunter2", "db_password: ***"),
        ("https://host/api?access_token=abc&page=2", "https://host/api?access_token=***&page=2"),
        ("AccountName=a;AccountKey=abc==;Suffix=c", "AccountName=a;AccountKey=***;Suffix=c"),
        ("Server=db;Uid=me;Pwd=hunter2;", "Server=db;Uid=me;Pwd=***;"),
        ("sb://x/;SharedAccessKeyName=k;SharedAccessKey=ab=", "sb://x/;SharedAccessKeyName=k;SharedAccessKey=***"),
        ("max_new_tokens=50 pad_token_id=0", "max_new_tokens=50 pad_token_id=0"),
    ],
)  # fmt: skip
def test_secret_pairs_inside_values_are_masked(value: str, expected: str) -> None:
    assert redact_value(value) == expected


@pytest.mark.parametrize(
    "secret",
    [
        "hf_" + "aB3" * 12,
        "ghp_" + "x1Y" * 12,
        "AKIA" + "ABCDEFGHIJ234567",
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
        "-----BEGIN RSA PRIVATE KEY-----\nMIIEow\nIBAAKC\n-----END RSA PRIVATE KEY-----",
    ],
)
def test_known_token_shapes_are_masked_under_any_key(secret: str) -> None:
    value = f"using {secret} now"
    assert redact("notes", value) == f"using {MASK} now"


def test_plain_values_are_unchanged() -> None:
    plain = [
        "distilbert-base-uncased",
        "0.001",
        "local_m_hpo_trial_study-350a79aa_t05_1",
        "t05_1 m study-350a79aa",
        "a=b",
        "",
    ]
    for value in plain:
        assert redact("whatever", value) == value


_SAFE = string.ascii_letters + string.digits


@given(
    user=st.text(_SAFE, min_size=1, max_size=20),
    password=st.text(_SAFE + "!$%*()~", min_size=8, max_size=40),
    scheme=st.sampled_from(["http", "https", "postgresql", "mysql+pymysql", "s3"]),
)
def test_url_password_never_survives(user: str, password: str, scheme: str) -> None:
    masked = redact_value(f"uri {scheme}://{user}:{password}@host.example:5432/db")
    assert password not in masked
    assert masked == f"uri {scheme}://***@host.example:5432/db"


@given(key=st.text(max_size=40), value=st.text(max_size=200))
def test_redact_is_total_and_idempotent(key: str, value: str) -> None:
    once = redact(key, value)
    assert isinstance(once, str)
    assert redact(key, once) == once


@given(
    prefix=st.sampled_from(["", "db_", "AZURE_", "my.", "x-"]),
    word=st.sampled_from(["token", "secret", "password", "passwd", "apikey", "sas"]),
    upper=st.booleans(),
    value=st.text(max_size=50),
)
def test_secret_keys_always_mask_the_whole_value(
    prefix: str, word: str, upper: bool, value: str
) -> None:
    key = (prefix + word).upper() if upper else prefix + word
    assert redact(key, value) == MASK
