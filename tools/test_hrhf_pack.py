#!/usr/bin/env python3
"""Tests of tools/hrhf_pack.py: the packs hrhf-synth wrote (Tests/HRHFTests/Fixtures/packs) are read and
decoded, and every refusal of docs/pack-format.md is met by a hostile pack built here with tarfile.

    python3 tools/test_hrhf_pack.py        # run by .ci/run; ends with unittest's summary
    HRHF_PACK_HOSTILE_DIR=DIR python3 tools/test_hrhf_pack.py   # also keeps every refused pack in DIR,
        # NNN.tar with NNN.txt naming the test, entry and problem, to try another reader on them
"""

import copy
import hashlib
import importlib.util
import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import tempfile
import types
import unittest
import zlib

TOOLS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TOOLS)
sys.path.insert(0, TOOLS)
import hrhf_pack  # noqa: E402
from hrhf_pack import Pack, PackError  # noqa: E402

FIXTURES = os.path.join(ROOT, "Tests", "HRHFTests", "Fixtures", "packs")
WHOLE = os.path.join(FIXTURES, "shapes-32px-2.tar")
SHARD = os.path.join(FIXTURES, "shapes-32px-shard-2of2.tar")
# `hrhf-pack import` of `hrhf-pack export WHOLE --voc`: the same pixels, its own generator.
IMPORTED = os.path.join(FIXTURES, "imported-32px-2.tar")
SCHEMA = os.path.join(ROOT, "docs", "pack-manifest.schema.json")
# SHA-256 of the decoded RGB pixels and label values; PackFixtureTests.swift asserts the same digests
# from libpng's decoding, so both readers see the same pixels.
DECODED = {
    WHOLE: [("f4903cfc78a28b77a67f8e08dd7a3929817acb983c1285cd1f70333dd507b2c0",
             "22d1f0f59540682ed30d93b7dd77dd80d4a07523eb3d87966a9e23e41c7ef8ca"),
            ("ec88a61cfa4a0241fee301e6f2af66c650f1196bf0bea7721b35254f33fb23b5",
             "951ae15e65ffa8f17ab17c907dc7b205a7ce421c9399be2297f266ed6448200f")],
    SHARD: [("99572119cad916e3c2e1834f6b3840a45ebf01e067d878c123a0532a5f259d85",
             "c3d0c71bc4225f92caafbc6e366b19e66a70df4a32dddcf76bcad97a41785494"),
            ("bf00fadd20c526bae3df590dc77217b30ac02641eee718fada8fb9c468b83da5",
             "aa216a2845ae584ce09cfeb5bb1c024b9773f52cb4248af08f8527a37b143209")],
}


# ---------------------------------------------------------------------------------------------------
# PNG and tar builders.

def chunk(kind, body):
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def filtered(rows, bpp, filters):
    """Rows of samples, each preceded by its filter byte and filtered with it (the PNG encoder's side)."""
    out, prev = bytearray(), bytes(len(rows[0]))
    for row, kind in zip(rows, filters):
        line = bytearray()
        for i, x in enumerate(row):
            a = row[i - bpp] if i >= bpp else 0
            b, c = prev[i], (prev[i - bpp] if i >= bpp else 0)
            if kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                predictor = a if pa <= pb and pa <= pc else b if pb <= pc else c
            else:
                predictor = [0, a, b, (a + b) >> 1][kind]
            line.append((x - predictor) & 255)
        out += bytes([kind]) + line
        prev = row
    return bytes(out)


def png(rows, colour, width=None, depth=8, interlace=0, palette=None, filters=None, idat=None, extra=b""):
    """A PNG of `rows` (bytes of samples each); `idat` replaces the compressed data when given."""
    channels = hrhf_pack.CHANNELS[colour]
    width = width if width is not None else len(rows[0]) // channels
    filters = filters or [0] * len(rows)
    data = idat if idat is not None else zlib.compress(filtered(rows, channels, filters))
    ihdr = struct.pack(">IIBBBBB", width, len(rows), depth, colour, 0, 0, interlace)
    plte = chunk(b"PLTE", palette) if palette is not None else b""
    return hrhf_pack.PNG_SIGNATURE + chunk(b"IHDR", ihdr) + plte + chunk(b"IDAT", data) + extra + chunk(b"IEND", b"")


def grey_label(size, value=0):
    return png([bytes([value]) * size] * size, 0)


def info(name, data=b"", kind=tarfile.REGTYPE, **attributes):
    member = tarfile.TarInfo(name)
    member.type, member.size, member.mtime, member.uname, member.gname = kind, len(data), 0, "root", "root"
    for key, value in attributes.items():
        setattr(member, key, value)
    return member, data


def tar_bytes(members, format=tarfile.PAX_FORMAT):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=format, encoding="utf-8", errors="surrogateescape") as tar:
        for member, data in members:
            tar.addfile(member, io.BytesIO(data) if member.isfile() or member.type == tarfile.GNUTYPE_SPARSE else None)
    return buffer.getvalue()


def patched(header, kind=None, size=None):
    """A ustar header with its type or size field replaced and its checksum made right again."""
    header = bytearray(header)
    if kind is not None:
        header[156:157] = kind
    if size is not None:
        header[124:136] = b"%011o\0" % size
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def sums_of(members):
    return "".join(f"{hashlib.sha256(data).hexdigest()}  {m.name}\n" for m, data in members).encode()


class Fixture:
    """The whole fixture pack's manifest and entries, to be changed and rebuilt."""

    def __init__(self, path=WHOLE):
        with tarfile.open(path) as tar:
            self.files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        self.manifest = json.loads(self.files.pop("manifest.json"))
        del self.files["SHA256SUMS"]

    def members(self, manifest=None, files=None):
        """manifest.json, the files in record order, SHA256SUMS over them (what SyntheticPack.write does)."""
        manifest = self.manifest if manifest is None else manifest
        files = self.files if files is None else files
        body = manifest if isinstance(manifest, bytes) else json.dumps(manifest, indent=2).encode()
        members = [info("manifest.json", body)] + [info(n, d) for n, d in files.items()]
        return members + [info("SHA256SUMS", sums_of(members))]


class PackTestCase(unittest.TestCase):
    def setUp(self):
        self.directory = tempfile.TemporaryDirectory()
        self.addCleanup(self.directory.cleanup)
        self.fixture = Fixture()

    def write(self, content, name="hostile.tar"):
        path = os.path.join(self.directory.name, name)
        with open(path, "wb") as out:
            out.write(content if isinstance(content, bytes) else tar_bytes(content))
        return path

    def refused(self, content, entry, problem, **limits):
        """Asserts the pack is refused naming it, `entry` and a problem containing `problem`."""
        path = self.write(content)
        with self.assertRaises(PackError) as caught:
            Pack(path, **limits).close()
        self.assertEqual((caught.exception.pack, caught.exception.entry), (path, entry), str(caught.exception))
        self.assertIn(problem, caught.exception.problem)
        keep = os.environ.get("HRHF_PACK_HOSTILE_DIR")
        if keep and not limits:
            number = len([n for n in os.listdir(keep) if n.endswith(".tar")])
            with open(os.path.join(keep, "%03d.txt" % number), "w") as note:
                note.write(f"{self.id()}: {caught.exception.entry}: {caught.exception.problem}\n")
            os.rename(path, os.path.join(keep, "%03d.tar" % number))
        return caught.exception

    def manifest_refused(self, change, field, problem):
        manifest = copy.deepcopy(self.fixture.manifest)
        change(manifest)
        return self.refused(self.fixture.members(manifest), f"manifest.json: {field}", problem)


# ---------------------------------------------------------------------------------------------------

class FixturePacks(PackTestCase):
    def test_whole_and_shard_packs_verify_and_decode_to_the_swift_pixels(self):
        for path, shard, indices in ((WHOLE, None, [0, 1]), (SHARD, {"index": 2, "count": 2}, [1, 3])):
            with Pack(path) as pack:
                self.assertEqual(pack.manifest.get("shard"), shard)
                self.assertEqual([r["index"] for r in pack.records], indices)
                self.assertEqual(pack.order[0], "manifest.json")
                self.assertEqual(pack.order[-1], "SHA256SUMS")
                self.assertEqual(len(pack.order), 2 + 2 * len(indices))
                decoded = [(hashlib.sha256(image.pixels).hexdigest(), hashlib.sha256(label.values).hexdigest())
                           for image, label, _ in pack]
                self.assertEqual(decoded, DECODED[path])
                for image, label, record in pack:
                    self.assertEqual((image.width, image.height, len(image.pixels)), (32, 32, 32 * 32 * 3))
                    self.assertEqual((label.width, label.height, len(label.values)), (32, 32, 32 * 32))
                    self.assertLessEqual(set(label.values), set(range(16)) | {255})
                    self.assertEqual(record["image"], "images/%06d.png" % record["index"])

    def test_an_imported_pack_holds_the_exported_packs_pixels(self):
        with Pack(IMPORTED) as pack:
            self.assertEqual(pack.manifest["generator"]["name"], "hrhf-pack import")
            self.assertEqual(pack.manifest["generator"]["options"]["iterations"], 0)
            self.assertEqual([c["id"] for c in pack.manifest["classes"]], [6])
            decoded = [(hashlib.sha256(image.pixels).hexdigest(), hashlib.sha256(label.values).hexdigest())
                       for image, label, _ in pack]
            self.assertEqual(decoded, DECODED[WHOLE])
            for _, label, record in pack:
                self.assertEqual(record["targets"], [6])
                self.assertEqual(record["achievedAreas"], [label.values.count(6) / 1024])
                self.assertEqual(record["targetAreas"], record["achievedAreas"])

    def test_fixture_labels_carry_the_voc_palette(self):
        voc = bytearray()
        for i in range(256):
            rgb = [0, 0, 0]
            for j in range(8):
                for channel in range(3):
                    rgb[channel] |= ((i >> (3 * j + channel)) & 1) << (7 - j)
            voc += bytes(rgb)
        self.assertEqual(voc[3 * 255:], b"\xe0\xe0\xc0")  # VOC's ignore colour
        with Pack(WHOLE) as pack:
            for record in pack.records:
                ihdr, palette, _ = hrhf_pack.png_chunks(pack.read(record["label"]), WHOLE, record["label"])
                self.assertEqual((ihdr[2], ihdr[3], palette), (8, 3, bytes(voc)))

    def test_fixture_entries_follow_the_reproducibility_rules(self):
        for path in (WHOLE, SHARD, IMPORTED):
            with tarfile.open(path) as tar:
                for member in tar.getmembers():
                    self.assertEqual((member.type, member.mode, member.mtime, member.uid, member.gid, member.uname,
                                      member.gname), (tarfile.REGTYPE, 0o644, 0, 0, 0, "root", "root"), member.name)
                blocks = sum(1 + (m.size + 511) // 512 for m in tar.getmembers())
            # Two zero blocks end the archive, with no padding to a record size after them.
            with open(path, "rb") as stream:
                content = stream.read()
            self.assertEqual(len(content), 512 * (blocks + 2))
            self.assertEqual(content[-1024:], bytes(1024))

    def test_manifests_match_the_committed_json_schema(self):
        try:
            import jsonschema
        except ImportError:
            print("\nskipped: jsonschema is not installed, the JSON Schema check did not run", file=sys.stderr)
            self.skipTest("jsonschema is not installed")
        with open(SCHEMA) as stream:
            schema = json.load(stream)
        jsonschema.Draft202012Validator.check_schema(schema)
        validator = jsonschema.Draft202012Validator(schema)
        for path in (WHOLE, SHARD, IMPORTED):
            with Pack(path) as pack:
                self.assertEqual(list(validator.iter_errors(pack.manifest)), [], path)
        hostile = [
            lambda m: m.update(extra=1),
            lambda m: m.pop("quality"),
            lambda m: m["generator"]["options"].update(resolution="32"),
            lambda m: m["generator"]["options"].update(flip=1),
            lambda m: m["images"][0].update(index=-1),
            lambda m: m["images"][0].update(image="../x.png"),
            lambda m: m["teacher"].update(sha256="D" * 64),
            lambda m: m.update(formatVersion=2),
            lambda m: m["images"][0]["targetAreas"].__setitem__(0, 1.5),
            lambda m: m["teacher"]["card"]["architecture"].update(flavor="keras"),
        ]
        for number, change in enumerate(hostile):
            manifest = copy.deepcopy(self.fixture.manifest)
            change(manifest)
            self.assertFalse(validator.is_valid(manifest), f"hostile manifest {number} passes the schema")
            with self.assertRaises(hrhf_pack.ManifestProblem, msg=f"hostile manifest {number}"):
                hrhf_pack.check_manifest(manifest)

    def test_a_rebuilt_pack_with_optional_fields_null_or_absent_is_read(self):
        manifest = copy.deepcopy(self.fixture.manifest)
        manifest["shard"] = None
        manifest["quality"]["imagesPerMinute"] = 12.5
        with Pack(self.write(self.fixture.members(manifest))) as pack:
            self.assertEqual(len(pack), 2)

    def test_a_pack_retarred_in_gnu_format_or_padded_to_records_is_read(self):
        gnu = tar_bytes(self.fixture.members(), tarfile.GNU_FORMAT)
        self.assertEqual(gnu[257:265], b"ustar  \0")
        for content in (gnu, tar_bytes(self.fixture.members()) + bytes(10240)):
            with Pack(self.write(content)) as pack:
                self.assertEqual([r["index"] for r in pack.records], [0, 1])

    def test_arrays(self):
        try:
            import numpy
        except ImportError:
            self.skipTest("numpy is not installed")
        with Pack(WHOLE) as pack:
            arrays = list(pack.arrays())
            image, label, record = arrays[1]
            self.assertEqual((image.shape, image.dtype, label.shape, label.dtype),
                             ((32, 32, 3), numpy.uint8, (32, 32), numpy.uint8))
            self.assertEqual(hashlib.sha256(image.tobytes()).hexdigest(), DECODED[WHOLE][1][0])
            self.assertEqual(hashlib.sha256(label.tobytes()).hexdigest(), DECODED[WHOLE][1][1])
            self.assertEqual(record["index"], 1)

    def test_torch_dataset_with_a_stand_in_torch(self):
        try:
            import numpy
        except ImportError:
            self.skipTest("numpy is not installed")
        # A stand-in torch (the real one may be absent): Dataset and from_numpy are all the class uses.
        torch = types.ModuleType("torch")
        torch.from_numpy = lambda array: ("tensor", array)
        torch.utils = types.ModuleType("torch.utils")
        torch.utils.data = types.ModuleType("torch.utils.data")
        torch.utils.data.Dataset = type("Dataset", (), {})
        saved = {k: sys.modules.get(k) for k in ("torch", "torch.utils", "torch.utils.data")}
        sys.modules.update({"torch": torch, "torch.utils": torch.utils, "torch.utils.data": torch.utils.data})
        try:
            spec = importlib.util.spec_from_file_location("hrhf_pack_with_torch", os.path.join(TOOLS, "hrhf_pack.py"))
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        finally:
            for key, value in saved.items():
                if value is None:
                    sys.modules.pop(key, None)
                else:
                    sys.modules[key] = value
        dataset = module.PackDataset(WHOLE)
        self.assertIsInstance(dataset, torch.utils.data.Dataset)
        self.assertEqual(len(dataset), 2)
        (_, image), (_, label), record = dataset[0]
        self.assertEqual((image.shape, image.dtype, label.shape, label.dtype),
                         ((3, 32, 32), numpy.uint8, (32, 32), numpy.int64))
        self.assertEqual(hashlib.sha256(image.transpose(1, 2, 0).tobytes()).hexdigest(), DECODED[WHOLE][0][0])
        self.assertEqual(record["index"], 0)
        dataset.pack.close()


class Command(PackTestCase):
    def run_tool(self, *args):
        return subprocess.run([sys.executable, os.path.join(TOOLS, "hrhf_pack.py"), *args], capture_output=True,
                              text=True)

    def test_verify_and_inspect(self):
        result = self.run_tool("verify", WHOLE)
        self.assertEqual((result.returncode, result.stdout, result.stderr),
                         (0, f"{WHOLE}: OK, 2 images, 6 entries, checksums match\n", ""))
        result = self.run_tool("inspect", SHARD)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("images          2 of 4 (shard 2/2)", result.stdout)
        self.assertIn("resolution      32", result.stdout)

    def test_refusal_exits_1_naming_pack_entry_problem(self):
        files = dict(self.fixture.files)
        files["labels/000001.png"] = grey_label(32, 16)
        path = self.write(self.fixture.members(files=files))
        for command in (["verify", path], ["inspect", path], ["extract", path, self.directory.name]):
            result = self.run_tool(*command)
            self.assertEqual(result.returncode, 1)
            self.assertEqual(result.stdout, "")
            self.assertEqual(result.stderr, f"hrhf_pack.py: error: {path}: labels/000001.png: label value 16 at x=0, "
                                            "y=0 is neither a teacher class id (0-15) nor 255 (ignore)\n")
        self.assertEqual(sorted(os.listdir(self.directory.name)), ["hostile.tar"])

    def test_extract_writes_the_entries_and_nothing_else(self):
        out = os.path.join(self.directory.name, "out")
        os.mkdir(out)
        result = self.run_tool("extract", WHOLE, out)
        self.assertEqual(result.returncode, 0, result.stderr)
        written = sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs)
        self.assertEqual(written, ["SHA256SUMS", "images/000000.png", "images/000001.png", "labels/000000.png",
                                   "labels/000001.png", "manifest.json"])
        with tarfile.open(WHOLE) as tar:
            for member in tar.getmembers():
                with open(os.path.join(out, member.name), "rb") as stream:
                    self.assertEqual(stream.read(), tar.extractfile(member).read(), member.name)

    def test_extract_replaces_a_stale_partial(self):
        out = os.path.join(self.directory.name, "out")
        os.makedirs(os.path.join(out, "labels"))
        with open(os.path.join(out, "labels", "000001.png.partial"), "wb") as stale:
            stale.write(b"stale")
        with Pack(WHOLE) as pack:
            pack.extract(out)
            with open(os.path.join(out, "labels", "000001.png"), "rb") as stream:
                self.assertEqual(stream.read(), pack.read("labels/000001.png"))
        self.assertEqual(sorted(os.listdir(os.path.join(out, "labels"))), ["000000.png", "000001.png"])

    def test_extract_refuses_a_planted_link(self):
        out = os.path.join(self.directory.name, "out")
        outside = os.path.join(self.directory.name, "outside")
        os.mkdir(out)
        os.mkdir(outside)
        os.symlink(outside, os.path.join(out, "images"))
        result = self.run_tool("extract", WHOLE, out)
        self.assertEqual((result.returncode, result.stdout), (1, ""))
        self.assertEqual(result.stderr, f"hrhf_pack.py: error: {WHOLE}: images: cannot write {out}/images: "
                                        "Not a directory\n")
        self.assertEqual(os.listdir(outside), [])
        self.assertEqual(sorted(os.listdir(out)), ["images"])


class Names(PackTestCase):
    """Rule 1: only the pack's names; duplicates refused."""

    def test_names_outside_the_whitelist(self):
        hostile = ["/etc/passwd", "../manifest.json", "images/../../x.png", "./images/000000.png",
                   "images//000000.png", "images/000000.png/x", "images\\000000.png", "images/00000\x01.png",
                   "images/00000.png", "images/0000000000.png", "images/000000.PNG", "images/000000.png.sh",
                   "notes.txt", "images/\u0660\u0660\u0660\u0660\u0660\u0660.png", "", "manifest.json ",
                   "images/" + "0" * 200 + ".png"]
        for name in hostile:
            members = self.fixture.members()
            members.insert(1, info(name, b"x"))
            self.refused(members, hrhf_pack.shown(name), "not a pack entry name")

    def test_nul_and_non_utf8_names(self):
        members = self.fixture.members()
        member, data = info("images/000000.png", b"x")
        member.pax_headers = {"path": "images/000000.png\x00.sh"}
        members.insert(1, (member, data))
        self.refused(members, "b'images/000000.png\\x00.sh'", "not a pack entry name")
        members = self.fixture.members()
        members.insert(1, info("images/\udcff.png", b"x"))
        self.refused(tar_bytes(members, tarfile.USTAR_FORMAT), "b'images/\\xff.png'", "must be UTF-8")

    def test_a_trailing_slash_on_a_regular_file(self):
        members = self.fixture.members()
        members.insert(1, info("images/000000.png/", b"x"))
        self.refused(members, "images/000000.png/", "not a pack entry name")

    def test_duplicate_names(self):
        members = self.fixture.members()
        members.insert(2, members[1])
        self.refused(members, "images/000000.png", "appears twice")


class Types(PackTestCase):
    """Rule 2: regular files only."""

    def test_links_devices_directories_fifos(self):
        cases = [(tarfile.SYMTYPE, "a symbolic link"), (tarfile.LNKTYPE, "a hard link"),
                 (tarfile.CHRTYPE, "a character device"), (tarfile.BLKTYPE, "a block device"),
                 (tarfile.FIFOTYPE, "a FIFO"), (tarfile.CONTTYPE, "a contiguous")]
        for kind, described in cases:
            members = self.fixture.members()
            data = members[1][1] if kind == tarfile.CONTTYPE else b""
            members[1] = info("images/000000.png", data, kind=kind, linkname="/etc/passwd")
            self.refused(members, "images/000000.png", f"is {described}")
        # tarfile ends a directory's name with "/", refused by name; this directory is named like an image.
        content = tar_bytes(self.fixture.members())
        at = 512 * (1 + (len(self.fixture.members()[0][1]) + 511) // 512)
        directory = content[:at] + patched(content[at:at + 512], kind=tarfile.DIRTYPE) + content[at + 512:]
        self.refused(directory, "images/000000.png", "is a directory")

    def test_gnu_sparse(self):
        members = self.fixture.members()
        members[1][0].type = tarfile.GNUTYPE_SPARSE
        self.refused(tar_bytes(members, tarfile.GNU_FORMAT), "images/000000.png", "sparse entries")

    def test_pax_sparse(self):
        members = self.fixture.members()
        _, data = members[1]
        sparse_map = b"1\n0\n%d\n" % len(data)
        sparse_map += bytes(-len(sparse_map) % 512)
        member, body = info("GNUSparseFile.0/000000.png", sparse_map + data)
        member.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "images/000000.png",
                              "GNU.sparse.realsize": str(len(data)), "path": "images/000000.png"}
        members[1] = (member, body)
        self.refused(members, "images/000000.png", "sparse entries")

    def test_global_pax_header(self):
        members = self.fixture.members()
        content = tar_bytes(members)
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT,
                          pax_headers={"comment": "x"}) as tar:
            pass
        self.refused(buffer.getvalue()[:1024] + content, "././@PaxHeader", "global pax headers")


class Sizes(PackTestCase):
    """Rule 3: entry and archive budgets, from headers before any data is read."""

    def test_an_entry_over_the_limit_is_refused_from_its_header(self):
        members = self.fixture.members()
        manifest_blocks = 1 + (len(members[0][1]) + 511) // 512
        content = tar_bytes(members[:1])[:512 * manifest_blocks]  # manifest.json, no end-of-archive blocks
        header = patched(tar_bytes([info("images/000000.png")])[:512], size=hrhf_pack.ENTRY_LIMIT + 1)
        # No data follows the header: refusing from the header alone is the only way to name the size.
        self.refused(content + header, "images/000000.png", f"{hrhf_pack.ENTRY_LIMIT + 1} bytes is over")
        manifest_size = len(members[0][1])
        self.refused(members, "manifest.json", f"{manifest_size} bytes is over the entry limit of 1000",
                     entry_limit=1000)

    def test_the_total_budget(self):
        sizes = [len(d) for _, d in self.fixture.members()]
        budget = sum(sizes[:3])
        self.refused(self.fixture.members(), "images/000001.png", f"over {budget} bytes", total_limit=budget)

    def test_truncated_archives(self):
        content = tar_bytes(self.fixture.members())
        self.refused(content[:700], "manifest.json", "truncated inside this entry")
        self.refused(content[:512 * 13 + 100], None, "truncated inside a header")
        end = 512 * sum(1 + (len(data) + 511) // 512 for _, data in self.fixture.members())
        self.assertEqual(content[end:], bytes(len(content) - end))
        self.refused(content[:end], None, "without its end-of-archive blocks")
        self.refused(content + b"\x01", None, "data after the end-of-archive")
        self.refused(content + bytes(hrhf_pack.TRAILER_LIMIT), None, "bytes of padding after the end")
        self.refused(b"n" + content[1:], "nanifest.json", "header checksum mismatch")
        self.refused(b"not a tar" + bytes(503), "not a tar", "header checksum field is not an octal number")


class Order(PackTestCase):
    """Rule 4: manifest.json first, SHA256SUMS last."""

    def test_manifest_not_first(self):
        members = self.fixture.members()
        members[0], members[1] = members[1], members[0]
        self.refused(members, "images/000000.png", "manifest.json must be")

    def test_sums_not_last(self):
        members = self.fixture.members()
        members.insert(-2, members.pop())
        self.refused(members, "images/000001.png", "follows SHA256SUMS")

    def test_missing_sums_and_empty_archive(self):
        self.refused(self.fixture.members()[:-1], "SHA256SUMS", "missing")
        self.refused(bytes(10240), "manifest.json", "missing")


class Checksums(PackTestCase):
    """Rule 5: the SHA256SUMS format; every entry listed once and matching."""

    def with_sums(self, change):
        members = self.fixture.members()
        members[-1] = info("SHA256SUMS", change(members[-1][1].decode()).encode())
        return members

    def test_format(self):
        for change, problem in [(str.upper, "line 1 is not"), (lambda s: s.replace("  ", " ", 1), "line 1 is not"),
                                (lambda s: s[:-1], "does not end with a line feed"),
                                (lambda s: s + "\n", "line 6 is not"),
                                (lambda s: s.replace("\n", "\r\n"), "line 1 names b'manifest.json\\r'"),
                                (lambda s: s + s.split("\n")[1] + "\n", "lists images/000000.png twice")]:
            self.refused(self.with_sums(change), "SHA256SUMS", problem)

    def test_listing(self):
        line = "%s  %s\n"
        self.refused(self.with_sums(lambda s: "\n".join(s.split("\n")[1:])), "manifest.json", "not listed")
        self.refused(self.with_sums(lambda s: s + line % ("0" * 64, "images/000009.png")), "images/000009.png",
                     "not an entry")
        self.refused(self.with_sums(lambda s: s + line % ("0" * 64, "SHA256SUMS")), "SHA256SUMS", "not an entry")

    def test_mismatch(self):
        members = self.fixture.members()
        damaged = bytearray(members[3][1])
        damaged[40] ^= 1
        members[3] = info(members[3][0].name, bytes(damaged))
        self.refused(members, "images/000001.png", "checksum mismatch")


class Manifest(PackTestCase):
    """Rule 6: identity, version, schema, semantics."""

    def test_identity_and_version(self):
        self.manifest_refused(lambda m: m.update(format="hrhf-model"), "format", "not a synthetic-pack manifest")
        for version in (2, 0, "1", 1.0, True, None):
            self.manifest_refused(lambda m: m.update(formatVersion=version), "formatVersion", "not a version")

    def test_a_newer_version_is_refused_before_its_entries_and_checksums(self):
        manifest = copy.deepcopy(self.fixture.manifest)
        manifest["formatVersion"] = 2
        members = self.fixture.members(manifest)
        members[-1] = info("SHA256SUMS", b"a new checksum format\n")
        members.insert(1, info("depth/000000.exr", b"a new entry"))
        self.refused(members, "manifest.json: formatVersion", "2 is not a version this reader reads (1 to 1)")

    def test_json(self):
        head = b'{"format": "hrhf-synthetic-pack", '
        for body, field, problem in [
                (b"{", "manifest", "not JSON"), (b"\xff{}", "manifest", "not UTF-8"),
                (b"[]", "format", "not a synthetic-pack"),
                (head + b'"formatVersion": NaN}', "manifest", "NaN is not JSON"),
                (head + b'"format": "x", "formatVersion": 1}', "format", "appears twice"),
                (head + b'"formatVersion": 1, "images": 1%s}' % (b"0" * 5000), "manifest", "not JSON")]:
            self.refused(self.fixture.members(body), f"manifest.json: {field}", problem)

    def test_schema(self):
        cases = [
            (lambda m: m.pop("quality"), "quality", "missing"),
            (lambda m: m.update(notes="x"), "notes", "unknown field"),
            (lambda m: m["images"][1].update(extra=1), "images[1].extra", "unknown field"),
            (lambda m: m["generator"]["options"].update(resolution="32"), "generator.options.resolution",
             "expected an integer"),
            (lambda m: m["generator"]["options"].update(resolution=32.0), "generator.options.resolution",
             "expected an integer"),
            (lambda m: m["generator"]["options"].update(flip=1), "generator.options.flip", "expected true or false"),
            (lambda m: m["generator"]["options"].update(maxClasses=True), "generator.options.maxClasses",
             "expected an integer"),
            (lambda m: m["generator"].update(seed=1 << 64), "generator.seed", "is outside"),
            (lambda m: m["generator"].update(seed=-1), "generator.seed", "is outside"),
            (lambda m: m["generator"]["options"].update(areaMin=1e39), "generator.options.areaMin", "finite"),
            (lambda m: m["images"][0]["losses"].update(tv1="x"), "images[0].losses.tv1", "finite number"),
            (lambda m: m["images"][0].update(targets=[8.5]), "images[0].targets[0]", "expected an integer"),
            (lambda m: m["teacher"]["card"].update(source={"file": "x"}), "teacher.card.source.sha256", "missing"),
            (lambda m: m["teacher"]["card"]["notes"].update(step=0), "teacher.card.notes.step", "expected a string"),
            (lambda m: m.update(shard={"index": 1}), "shard.count", "missing"),
        ]
        for change, field, problem in cases:
            self.manifest_refused(change, field, problem)

    def test_teacher(self):
        card = lambda m: m["teacher"]["card"]  # noqa: E731
        cases = [
            (lambda m: m["teacher"].update(sha256="A" * 64), "teacher.sha256", "lowercase hex"),
            (lambda m: card(m).update(format="onnx"), "teacher.card.format", "hrhf-model"),
            (lambda m: card(m).update(formatVersion=2), "teacher.card.formatVersion", "is not 1 to 1"),
            (lambda m: card(m)["architecture"].update(outputStride=32), "teacher.card.architecture.outputStride",
             "8 or 16"),
            (lambda m: card(m)["architecture"].update(layers=[1, 1, 1]), "teacher.card.architecture.layers", "four"),
            (lambda m: card(m)["architecture"].update(classesPerStep=[15]), "teacher.card.classes",
             "16 classes for 15 outputs"),
            (lambda m: card(m)["classes"].reverse(), "teacher.card.classes[0].id", "15, expected 0"),
            (lambda m: card(m)["normalization"].update(std=[0.2, 0.2, 0]), "teacher.card.normalization", "positive"),
        ]
        for change, field, problem in cases:
            self.manifest_refused(change, field, problem)

    def test_classes_and_options(self):
        cases = [
            (lambda m: m["classes"].insert(0, {"id": 0, "name": "background"}), "classes[0].id", "background"),
            (lambda m: m["classes"].append({"id": 16, "name": "x"}), "classes[15]", "not in the teacher's classes"),
            (lambda m: m["classes"][2].update(name="circle"), "classes[2]", "not in the teacher's classes"),
            (lambda m: m["classes"].append(m["classes"][0]), "classes[15].id", "listed twice"),
            (lambda m: m["generator"]["options"].update(maxClasses=0), "generator.options.maxClasses", "0 is below 1"),
            (lambda m: m["generator"]["options"].update(resolution=0), "generator.options.resolution", "outside"),
            (lambda m: m["generator"]["options"].update(resolution=4097), "generator.options.resolution",
             "4097 is outside 1...4096"),
            (lambda m: m["generator"].update(count=3), "images", "2 records for a whole pack of generator.count 3"),
            (lambda m: m["generator"].update(count=1), "images[1].index", "1 is outside 0...0"),
            (lambda m: m.update(shard={"index": 3, "count": 2}), "shard", "index 3 of 2"),
            (lambda m: m.update(shard={"index": 0, "count": 2}), "shard", "index 0 of 2"),
        ]
        for change, field, problem in cases:
            self.manifest_refused(change, field, problem)

    def test_records(self):
        record = lambda m: m["images"][1]  # noqa: E731
        cases = [
            (lambda m: record(m).update(targets=[], targetAreas=[], achievedAreas=[]), "images[1].targets",
             "0 targets, allowed 1...3"),
            (lambda m: record(m).update(targets=[1, 2, 3, 4], targetAreas=[0.1] * 4, achievedAreas=[0] * 4),
             "images[1].targets", "4 targets"),
            (lambda m: record(m).update(targetAreas=[0.1]), "images[1].targetAreas", "1 values for 2 targets"),
            (lambda m: record(m).update(achievedAreas=[0, 0, 0]), "images[1].achievedAreas", "3 values"),
            (lambda m: record(m).update(targetAreas=[0.1, 1.5]), "images[1].targetAreas[1]", "outside [0, 1]"),
            (lambda m: record(m).update(achievedAreas=[-0.1, 0]), "images[1].achievedAreas[0]", "outside [0, 1]"),
            (lambda m: record(m).update(targets=[1, 16]), "images[1].targets[1]", "16 is not one of the pack's"),
            (lambda m: record(m).update(targets=[4, 4]), "images[1].targets", "appears twice"),
            (lambda m: record(m).update(absentMaxArea=2), "images[1].absentMaxArea", "outside [0, 1]"),
            (lambda m: record(m).update(teacherConfidence=-1), "images[1].teacherConfidence", "outside [0, 1]"),
            (lambda m: record(m).update(index=-1), "images[1].index", "-1 is outside"),
            (lambda m: record(m).update(index=0), "images[1].image", "images/000001.png, expected images/000000.png"),
            (lambda m: record(m).update(label="../labels/000001.png"), "images[1].label", "expected labels/000001.png"),
            (lambda m: record(m).update(image="images/1.png"), "images[1].image", "expected images/000001.png"),
        ]
        for change, field, problem in cases:
            self.manifest_refused(change, field, problem)
        manifest = copy.deepcopy(self.fixture.manifest)
        manifest["images"][1] = copy.deepcopy(manifest["images"][0])
        self.refused(self.fixture.members(manifest), "manifest.json: images[1].index", "0 appears twice")

    def test_records_and_entries_match(self):
        files = dict(self.fixture.files)
        del files["labels/000001.png"]
        self.refused(self.fixture.members(files=files), "labels/000001.png", "named by the manifest (index 1)")
        files = dict(self.fixture.files)
        files["images/000002.png"] = files["images/000001.png"]
        self.refused(self.fixture.members(files=files), "images/000002.png", "not named by any record")
        manifest = copy.deepcopy(self.fixture.manifest)
        manifest.update(shard={"index": 1, "count": 1})
        del manifest["images"][1]
        files = {k: v for k, v in self.fixture.files.items() if k.endswith("0.png")}
        with Pack(self.write(self.fixture.members(manifest, files))) as pack:
            self.assertEqual(len(pack), 1)


class Images(PackTestCase):
    """Rule 7: PNG dimensions from IHDR, 8-bit types, label values, well-formed chunks and data."""

    def refused_file(self, name, data, problem):
        files = dict(self.fixture.files)
        files[name] = data
        return self.refused(self.fixture.members(files=files), name, problem)

    def test_dimensions(self):
        rgb = bytes(range(96))
        self.refused_file("images/000000.png", png([rgb] * 31, 2),
                          "PNG is 32 x 31, expected 32 x 32 (the pack's resolution)")
        self.refused_file("labels/000001.png", grey_label(33), "PNG is 33 x 33")
        huge = bytearray(png([b"\0"], 0))
        huge[16:24] = struct.pack(">II", 1 << 31, 1 << 31)  # refused from IHDR, before the CRC or the data
        self.refused_file("labels/000000.png", bytes(huge), "PNG is 2147483648 x 2147483648")

    def test_label_values(self):
        self.refused_file("labels/000001.png", grey_label(32, 16), "label value 16 at x=0, y=0 is neither")
        rows = [bytes(32)] * 31 + [bytes(31) + b"\xfe"]
        self.refused_file("labels/000000.png", png(rows, 3, palette=bytes(768)), "label value 254 at x=31, y=31")
        files = dict(self.fixture.files)
        files["labels/000000.png"] = png([bytes([15, 255] * 16)] * 32, 0)
        with Pack(self.write(self.fixture.members(files=files))) as pack:
            self.assertEqual(pack.label(pack.records[0]).values, bytes([15, 255] * 16) * 32)

    def test_types_and_depths(self):
        self.refused_file("labels/000000.png", png([bytes(96)] * 32, 2), "colour type 2; allowed: 8-bit types 0, 3")
        self.refused_file("labels/000000.png", png([bytes(64)] * 32, 0, width=32, depth=16), "16-bit colour type 0")
        self.refused_file("images/000000.png", png([bytes(128)] * 32, 4, width=32, depth=16), "16-bit colour type 4")
        self.refused_file("images/000000.png", png([bytes(32)] * 32, 0, interlace=1), "interlaced")
        self.refused_file("images/000000.png", png([bytes(32)] * 32, 3), "without a PLTE")
        self.refused_file("images/000001.png", png([bytes([5]) * 32] * 32, 3, palette=bytes(15)),
                          "palette index 5 is past the 5-entry palette")

    def test_chunks(self):
        good = grey_label(32)
        bad_crc = bytearray(good)
        bad_crc[-20] ^= 1
        self.refused_file("labels/000000.png", bytes(bad_crc), "fails its CRC")
        self.refused_file("labels/000000.png", b"GIF89a" + good[6:], "not a PNG file")
        self.refused_file("labels/000000.png", good[:-12], "no IEND")
        self.refused_file("labels/000000.png", good + b"x", "data after the PNG's IEND")
        self.refused_file("labels/000000.png", png([bytes(32)] * 32, 0, extra=chunk(b"ABCD", b"")),
                          "unknown critical chunk")
        rows = [bytes(32)] * 32
        split = zlib.compress(filtered(rows, 1, [0] * 32))
        interleaved = (hrhf_pack.PNG_SIGNATURE + chunk(b"IHDR", struct.pack(">IIBBBBB", 32, 32, 8, 0, 0, 0, 0))
                       + chunk(b"IDAT", split[:10]) + chunk(b"tEXt", b"a\0b") + chunk(b"IDAT", split[10:])
                       + chunk(b"IEND", b""))
        self.refused_file("labels/000000.png", interleaved, "not consecutive")

    def test_image_data(self):
        rows = [bytes(32)] * 32
        raw = filtered(rows, 1, [0] * 32)
        cases = [(zlib.compress(raw)[:-6], "not the 1056 bytes"), (zlib.compress(raw + b"\0"), "not the 1056 bytes"),
                 (zlib.compress(raw[:-1]), "not the 1056 bytes"), (zlib.compress(raw) + b"x", "not the 1056 bytes"),
                 (b"\x78\x9c\xff\xff", "does not inflate"),
                 (zlib.compress(b"\x05" + raw[1:]), "row 0 has filter type 5")]
        for idat, problem in cases:
            self.refused_file("labels/000000.png", png(rows, 0, idat=idat), problem)

    def test_every_filter_type_and_colour_type_decodes(self):
        size = 32
        samples = lambda channels: [bytes((x * 37 + y * 11 + c * 101) % 256 for x in range(size)  # noqa: E731
                                          for c in range(channels)) for y in range(size)]
        filters = [y % 5 for y in range(size)]
        files = dict(self.fixture.files)
        rgb = samples(3)
        label_rows = [bytes(v % 16 for v in row) for row in samples(1)]
        files["images/000000.png"] = png(rgb, 2, filters=filters)
        files["labels/000000.png"] = png(label_rows, 3, palette=bytes(768), filters=filters[::-1])
        grey = samples(1)
        files["images/000001.png"] = png(grey, 0, filters=filters)
        files["labels/000001.png"] = png(label_rows, 0, filters=filters)
        with Pack(self.write(self.fixture.members(files=files))) as pack:
            (image0, label0, _), (image1, label1, _) = list(pack)
            self.assertEqual(image0.pixels, b"".join(rgb))
            self.assertEqual(label0.values, b"".join(label_rows))
            self.assertEqual(label1.values, b"".join(label_rows))
            self.assertEqual(image1.pixels, bytes(v for row in grey for v in row for _ in range(3)))
        rgba = samples(4)
        palette = bytes(range(256)) * 3
        index_rows = [bytes(v % 200 for v in row) for row in samples(1)]
        for colour, rows, expected in [
                (6, rgba, b"".join(bytes(p for i, p in enumerate(r) if i % 4 != 3) for r in rgba)),
                (4, samples(2), b"".join(bytes(v for i, v in enumerate(r) if i % 2 == 0 for _ in range(3))
                                         for r in samples(2))),
                (3, index_rows, b"".join(palette[3 * i:3 * i + 3] for r in index_rows for i in r))]:
            data = png(rows, colour, palette=palette if colour == 3 else None, filters=filters)
            self.assertEqual(hrhf_pack.decode_image(data, "p", "e", size).pixels, expected, f"colour type {colour}")


if __name__ == "__main__":
    unittest.main(verbosity=2)
