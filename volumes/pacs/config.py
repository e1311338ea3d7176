"""The `volumes pacs` configuration: one YAML or JSON file.

```yaml
ae_title: VOLUMES            # our AE title
bind: 127.0.0.1              # listen address (default loopback; set the host's address to serve a PACS)
port: 11112
peers:                       # the only AEs allowed to call us (AE title AND address must match)
  - {ae_title: ORTHANC, host: 127.0.0.1, port: 4242}
storage: incoming            # received files, by study and series (relative to this file)
output: results              # BatchInference outputs, ledger.sqlite, audit.jsonl
quiet_s: 10                  # a study is complete this long after its last association ended
min_free_mb: 500             # below this free disk on `storage`, associations are refused
bundles:
  - {path: bundles/dinov2_unet_segmentation, weights: null, set: {inference_slab: 8}}
rules: rules.yaml            # series selection rules (volumes.pacs.rules); inline mapping also accepted
destinations:                # where SEG + SR go; each must be confirmed
  - {kind: dimse, ae_title: ORTHANC, host: 127.0.0.1, port: 4242}
  - {kind: dicomweb, url: "http://127.0.0.1:8042/dicom-web"}
source: {kind: dimse, ae_title: ORTHANC, host: 127.0.0.1, port: 4242}   # for `pull`
tries: 4                     # send attempts per destination before the job is failed
backoff_s: 2.0               # first retry delay; doubles each time
timeout_s: 30                # network timeout per DIMSE / HTTP exchange
patient_salt: ""             # salt of the PatientID hash in the audit log
device: auto
viewer: "http://127.0.0.1:3000"   # optional: `volumes pacs viewer` (OHIF) origin; each study's URL is logged
```

Relative paths are relative to the config file's folder. A bad value raises
:class:`volumes.errors.VolumesError` naming the file and the key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from volumes.errors import VolumesError

__all__ = ["Endpoint", "BundleSpec", "PacsConfig", "load_config"]

_AE_MAX = 16  # DICOM AE titles are at most 16 characters (PS3.5 6.2)


@dataclass(frozen=True)
class Endpoint:
    """A DIMSE peer (``ae_title``, ``host``, ``port``) or a DICOMweb service (``url``)."""

    kind: str = "dimse"
    ae_title: str = ""
    host: str = "127.0.0.1"
    port: int = 104
    url: str = ""

    @property
    def name(self) -> str:
        return self.url if self.kind == "dicomweb" else f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class BundleSpec:
    """One bundle to run: its folder, optional checkpoint and config overrides."""

    path: Path
    weights: Path | None = None
    overrides: dict = field(default_factory=dict)


@dataclass
class PacsConfig:
    """Parsed configuration (see the module docstring for the file format)."""

    ae_title: str = "VOLUMES"
    bind: str = "127.0.0.1"
    port: int = 11112
    peers: list[Endpoint] = field(default_factory=list)
    storage: Path = Path("incoming")
    output: Path = Path("results")
    quiet_s: float = 10.0
    min_free_mb: float = 500.0
    bundles: list[BundleSpec] = field(default_factory=list)
    rules: dict = field(default_factory=dict)
    destinations: list[Endpoint] = field(default_factory=list)
    source: Endpoint | None = None
    tries: int = 4
    backoff_s: float = 2.0
    timeout_s: float = 30.0
    patient_salt: str = ""
    device: str = "auto"
    viewer: str = ""
    path: Path | None = None

    def viewer_url(self, study_uid: str) -> str | None:
        """The OHIF page of a study when a viewer is configured, else None."""
        if not self.viewer:
            return None
        from volumes.pacs.viewer import study_url

        return study_url(self.viewer, study_uid)

    def peer(self, ae_title: str) -> Endpoint | None:
        """The allowed peer with this AE title, if any."""
        return next((p for p in self.peers if p.ae_title == ae_title.strip()), None)


def _read_mapping(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as exc:
        raise VolumesError(f"{path}: cannot read the config file ({exc.strerror or exc})") from exc
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)  # safe_load: a config file never constructs Python objects
    except ValueError as exc:
        raise VolumesError(f"{path}: not valid JSON/YAML ({exc})") from exc
    except Exception as exc:  # yaml.YAMLError does not derive from ValueError
        raise VolumesError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    if not isinstance(data, dict):
        raise VolumesError(f"{path}: must hold a mapping at the top level, got {type(data).__name__}")
    return data


def _ae(path: Path, key: str, value: Any) -> str:
    text = str(value or "").strip()
    if not text or len(text) > _AE_MAX or "\\" in text or not text.isprintable():
        raise VolumesError(f"{path}: {key}={value!r} is not a valid AE title (1-16 printable characters, no '\\')")
    return text


def _endpoint(path: Path, key: str, value: Any) -> Endpoint:
    if not isinstance(value, Mapping):
        raise VolumesError(f"{path}: {key} must be a mapping like {{ae_title, host, port}} or {{kind: dicomweb, url}}")
    kind = str(value.get("kind", "dimse"))
    if kind == "dicomweb":
        url = str(value.get("url", ""))
        if not url.startswith(("http://", "https://")):
            raise VolumesError(f"{path}: {key}.url={url!r} must be an http(s) URL")
        return Endpoint(kind="dicomweb", url=url.rstrip("/"))
    if kind != "dimse":
        raise VolumesError(f"{path}: {key}.kind={kind!r} is not allowed; choose from ['dimse', 'dicomweb']")
    try:
        port = int(value.get("port", 104))
    except (TypeError, ValueError):
        raise VolumesError(f"{path}: {key}.port={value.get('port')!r} is not a port number") from None
    if not 0 < port < 65536:
        raise VolumesError(f"{path}: {key}.port={port} is outside 1..65535")
    return Endpoint(kind="dimse", ae_title=_ae(path, f"{key}.ae_title", value.get("ae_title")),
                    host=str(value.get("host", "127.0.0.1")), port=port)


def load_config(path: str | Path, **overrides: Any) -> PacsConfig:
    """Read and check a config file; ``overrides`` replace top-level keys (as in the file)."""
    path = Path(path).resolve()
    data = {**_read_mapping(path), **{k: v for k, v in overrides.items() if v is not None}}
    base = path.parent
    known = set(PacsConfig.__dataclass_fields__) - {"path"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise VolumesError(f"{path}: unknown keys {unknown}; allowed: {sorted(known)}")
    resolve = lambda value: (base / Path(str(value)).expanduser()).resolve()  # noqa: E731
    config = PacsConfig(path=path)
    config.ae_title = _ae(path, "ae_title", data.get("ae_title", config.ae_title))
    config.bind = str(data.get("bind", config.bind))
    for key in ("port", "tries"):
        try:
            setattr(config, key, int(data.get(key, getattr(config, key))))
        except (TypeError, ValueError):
            raise VolumesError(f"{path}: {key}={data.get(key)!r} must be an integer") from None
    for key in ("quiet_s", "min_free_mb", "backoff_s", "timeout_s"):
        try:
            value = float(data.get(key, getattr(config, key)))
        except (TypeError, ValueError):
            raise VolumesError(f"{path}: {key}={data.get(key)!r} must be a number") from None
        if value < 0:
            raise VolumesError(f"{path}: {key}={value} must be >= 0")
        setattr(config, key, value)
    if config.tries < 1:
        raise VolumesError(f"{path}: tries={config.tries} must be >= 1")
    config.peers = [_endpoint(path, f"peers[{i}]", p) for i, p in enumerate(data.get("peers") or [])]
    if any(p.kind != "dimse" for p in config.peers):
        raise VolumesError(f"{path}: peers are DIMSE AEs (ae_title, host, port)")
    config.destinations = [_endpoint(path, f"destinations[{i}]", d)
                           for i, d in enumerate(data.get("destinations") or [])]
    if data.get("source") is not None:
        config.source = _endpoint(path, "source", data["source"])
    config.storage = resolve(data.get("storage", config.storage))
    config.output = resolve(data.get("output", config.output))
    bundles = data.get("bundles") or []
    if not isinstance(bundles, list):
        raise VolumesError(f"{path}: bundles must be a list of {{path, weights, set}}")
    for i, spec in enumerate(bundles):
        spec = {"path": spec} if isinstance(spec, str) else spec
        if not isinstance(spec, Mapping) or "path" not in spec:
            raise VolumesError(f"{path}: bundles[{i}] needs a path")
        config.bundles.append(BundleSpec(path=resolve(spec["path"]),
                                         weights=resolve(spec["weights"]) if spec.get("weights") else None,
                                         overrides=dict(spec.get("set") or {})))
    rules = data.get("rules") or {}
    if isinstance(rules, (str, Path)):
        rules_path = resolve(rules)
        rules = _read_mapping(rules_path)
    if not isinstance(rules, Mapping):
        raise VolumesError(f"{path}: rules must be a file name or a mapping")
    config.rules = dict(rules)
    config.patient_salt = str(data.get("patient_salt", ""))
    config.device = str(data.get("device", config.device))
    viewer = str(data.get("viewer") or "").rstrip("/")
    if viewer and not viewer.startswith(("http://", "https://")):
        raise VolumesError(f"{path}: viewer={viewer!r} must be the viewer's http(s) origin, e.g. http://127.0.0.1:3000")
    config.viewer = viewer
    return config
