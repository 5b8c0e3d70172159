#!/usr/bin/env python3
"""Reads and verifies HRHF synthetic packs (docs/pack-format.md) with the Python standard library only.

    python3 tools/hrhf_pack.py verify PACK        # every check of docs/pack-format.md, section "Refusals"
    python3 tools/hrhf_pack.py inspect PACK       # verify, then print the generator, teacher, classes, quality
    python3 tools/hrhf_pack.py extract PACK DIR   # verify, then write the entries under DIR (atomically)

As a module:

    pack = hrhf_pack.Pack("synthetic.tar")        # verifies; raises PackError naming pack, entry and problem
    for image, label, record in pack: ...         # Image(width, height, pixels), Label(width, height, values)
    for image, label, record in pack.arrays(): ...  # NumPy: H x W x 3 and H x W uint8 (needs numpy)
    dataset = hrhf_pack.PackDataset("synthetic.tar")  # torch.utils.data.Dataset (needs torch and numpy)

A refused pack exits the command with status 1 and a message naming the pack, the entry and the problem.
"""

import argparse
import collections
import hashlib
import json
import math
import os
import re
import struct
import sys
import zlib

FORMAT_NAME = "hrhf-synthetic-pack"
FORMAT_VERSION = 1
MODEL_FORMAT_NAME = "hrhf-model"
MODEL_FORMAT_VERSION = 1
# An entry over this is refused from its header (a 4096 x 4096 RGB PNG stays under it); as the Swift reader.
ENTRY_LIMIT = 64 << 20
# All entries' data together (a full-size VOC pack of 128 px images is well under 1 GiB); as the Swift reader.
TOTAL_LIMIT = 16 << 30
# A pax extended header holds a few short records; anything larger is not a pack's.
PAX_HEADER_LIMIT = 1 << 20
# Zero padding after the end-of-archive block: tar writers pad to their record size (libarchive: 10 KiB).
TRAILER_LIMIT = 16 << 20
MAX_RESOLUTION = 4096

ENTRY_NAME = re.compile(r"(?:manifest\.json|SHA256SUMS|(?:images|labels)/[0-9]{6,9}\.png)\Z", re.ASCII)
SUMS_LINE = re.compile(r"([0-9a-f]{64})  ([^\n]*)\Z", re.ASCII)
SHA256_HEX = re.compile(r"[0-9a-f]{64}\Z", re.ASCII)

Image = collections.namedtuple("Image", "width height pixels")  # pixels: RGB bytes, row by row
Label = collections.namedtuple("Label", "width height values")   # values: one byte (class id or 255) per pixel


class PackError(Exception):
    """A refused pack: `pack` is its path, `entry` the entry or manifest field, `problem` what is wrong."""

    def __init__(self, pack, entry, problem):
        super().__init__(f"{pack}: {entry}: {problem}" if entry else f"{pack}: {problem}")
        self.pack, self.entry, self.problem = pack, entry, problem


def shown(name):
    """A name as messages print it: printable ASCII as is, anything else escaped."""
    if name and all(" " <= c <= "~" for c in name):
        return name
    return ascii(name.encode("utf-8", "surrogateescape"))


# ---------------------------------------------------------------------------------------------------
# The tar layer: 512-byte headers, ustar or pax; only regular files reach the pack layer.

TarEntry = collections.namedtuple("TarEntry", "name offset size")


def _octal(field, pack, entry, what):
    text = field.split(b"\0", 1)[0].strip(b" ")
    if field[:1] and field[0] & 0x80:
        raise PackError(pack, entry, f"{what} is in base-256, which no pack entry needs")
    if not text or not all(0x30 <= b <= 0x37 for b in text):
        raise PackError(pack, entry, f"{what} field is not an octal number")
    return int(text, 8)


def _pax_records(data, pack, entry):
    """Parses 'LEN key=value\\n' records; a malformed record is refused."""
    records, pos = {}, 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0 or not data[pos:space].isdigit():
            raise PackError(pack, entry, "malformed pax extended header")
        length = int(data[pos:space])
        record = data[space + 1:pos + length]
        if length <= space - pos or pos + length > len(data) or not record.endswith(b"\n") or b"=" not in record:
            raise PackError(pack, entry, "malformed pax extended header")
        key, value = record[:-1].split(b"=", 1)
        records[key.decode("utf-8", "surrogateescape")] = value
        pos += length
    return records


def scan_tar(path, stream, entry_limit=ENTRY_LIMIT, total_limit=TOTAL_LIMIT):
    """Yields a TarEntry for each regular file, refusing any other entry type, sparse files and oversized
    entries before their data is read. `stream` is the open pack; data is skipped, not read."""
    total = 0
    pax = None
    while True:
        header = stream.read(512)
        if len(header) == 0:
            raise PackError(path, None, "the archive ends without its end-of-archive blocks (truncated)")
        if len(header) < 512:
            raise PackError(path, None, "the archive is truncated inside a header")
        if header == bytes(512):
            # End of archive: only zero blocks (the writer's record padding) may follow.
            rest = stream.read(TRAILER_LIMIT + 1)
            if rest.count(0) != len(rest):
                raise PackError(path, None, "data after the end-of-archive blocks")
            if len(rest) > TRAILER_LIMIT:
                raise PackError(path, None, f"over {TRAILER_LIMIT} bytes of padding after the end of the archive")
            return
        raw_name = header[0:100].split(b"\0", 1)[0]
        where = shown(raw_name.decode("utf-8", "surrogateescape"))
        stored = _octal(header[148:156], path, where, "header checksum")
        if stored != sum(header[:148]) + 8 * 32 + sum(header[156:]):
            raise PackError(path, where, "header checksum mismatch: not a tar archive, or a damaged one")
        if header[257:263] not in (b"ustar\x00", b"ustar "):
            raise PackError(path, where, "not a POSIX (ustar/pax) tar header")
        kind = header[156:157]
        size = _octal(header[124:136], path, where, "size")
        prefix = header[345:500].split(b"\0", 1)[0] if header[257:263] == b"ustar\x00" else b""
        name = (prefix + b"/" + raw_name) if prefix else raw_name
        if pax is not None:
            if "path" in pax:
                name = pax["path"]
            if "size" in pax:
                if not pax["size"].isdigit():
                    raise PackError(path, where, "pax size is not a decimal number")
                size = int(pax["size"])
        try:
            name = name.decode("utf-8")
        except UnicodeDecodeError:
            raise PackError(path, ascii(name), "entry names must be UTF-8 (and one of the names of a pack)") from None
        sparse = kind == b"S" or (pax is not None and any(k.startswith("GNU.sparse.") for k in pax))
        pax = None
        if kind in (b"x", b"g"):
            if kind == b"g":
                raise PackError(path, shown(name), "global pax headers are not allowed in a pack")
            if size > PAX_HEADER_LIMIT:
                raise PackError(path, shown(name), f"pax extended header of {size} bytes is over {PAX_HEADER_LIMIT}")
            data = stream.read(size)
            if len(data) < size:
                raise PackError(path, shown(name), "the archive is truncated inside a pax header")
            stream.seek((-size) % 512, os.SEEK_CUR)
            pax = _pax_records(data, path, shown(name))
            continue
        check_entry_name(name, path)
        if sparse:
            raise PackError(path, name, "sparse entries are not allowed in a pack")
        if kind not in (b"0", b"\0"):
            described = {b"1": "a hard link", b"2": "a symbolic link", b"3": "a character device",
                         b"4": "a block device", b"5": "a directory", b"6": "a FIFO", b"7": "a contiguous file",
                         b"L": "a GNU long name", b"K": "a GNU long link name"}.get(kind, f"of type {kind!r}")
            raise PackError(path, name, f"is {described}: only regular files are allowed in a pack")
        if size > entry_limit:
            raise PackError(path, name, f"{size} bytes is over the entry limit of {entry_limit}")
        total += size
        if total > total_limit:
            raise PackError(path, name, f"the archive holds over {total_limit} bytes, its limit")
        offset = stream.tell()
        yield TarEntry(name, offset, size)
        stream.seek(offset + size + (-size) % 512)


def check_entry_name(name, pack):
    if not ENTRY_NAME.match(name):
        raise PackError(pack, shown(name), "not a pack entry name (manifest.json, SHA256SUMS, images/D.png or "
                                           "labels/D.png with six to nine digits D)")


def read_at(stream, entry, pack):
    """An entry's data by positioned reads, which leave the stream's offset (shared with forked loader
    workers) alone."""
    parts, done = [], 0
    while done < entry.size:
        part = os.pread(stream.fileno(), entry.size - done, entry.offset + done)
        if not part:
            raise PackError(pack, entry.name, "the archive is truncated inside this entry")
        parts.append(part)
        done += len(part)
    return b"".join(parts)


# ---------------------------------------------------------------------------------------------------
# PNG: chunks, IHDR, zlib, unfiltering. 8-bit, not interlaced.

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel


def png_chunks(data, pack, entry):
    """Returns IHDR fields (width, height, depth, colour, interlace), PLTE bytes, the joined IDAT data.
    Every chunk's CRC is checked; IHDR comes first, IDATs are consecutive, IEND ends the file."""
    if not data.startswith(PNG_SIGNATURE):
        raise PackError(pack, entry, "not a PNG file")
    pos, seen, idat, palette, ihdr = 8, [], [], None, None
    while True:
        if pos + 12 > len(data):
            raise PackError(pack, entry, "PNG is truncated (no IEND chunk)")
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        end = pos + 12 + length
        if length > 0x7FFFFFFF or end > len(data):
            raise PackError(pack, entry, f"PNG chunk {kind!r} runs past the end of the file")
        body = data[pos + 8:pos + 8 + length]
        if zlib.crc32(data[pos + 4:pos + 8 + length]) != struct.unpack(">I", data[end - 4:end])[0]:
            raise PackError(pack, entry, f"PNG chunk {kind!r} fails its CRC")
        if not seen and kind != b"IHDR":
            raise PackError(pack, entry, "PNG does not start with IHDR")
        if kind == b"IHDR":
            if seen or length != 13:
                raise PackError(pack, entry, "PNG has a misplaced or malformed IHDR")
            ihdr = struct.unpack(">IIBBBBB", body)
            if ihdr[5] != 0 or ihdr[4] != 0:
                raise PackError(pack, entry, "PNG compression or filter method is not 0")
        elif kind == b"PLTE":
            if palette is not None or idat or length % 3 or not 3 <= length <= 768:
                raise PackError(pack, entry, "PNG has a misplaced or malformed PLTE")
            palette = body
        elif kind == b"IDAT":
            if idat and seen[-1] != b"IDAT":
                raise PackError(pack, entry, "PNG IDAT chunks are not consecutive")
            idat.append(body)
        elif kind == b"IEND":
            if end != len(data):
                raise PackError(pack, entry, "data after the PNG's IEND chunk")
            break
        elif not kind[0] & 0x20:
            raise PackError(pack, entry, f"PNG has an unknown critical chunk {kind!r}")
        seen.append(kind)
        pos = end
    if not idat:
        raise PackError(pack, entry, "PNG has no image data")
    return ihdr, palette, b"".join(idat)


def png_header(data, pack, entry):
    """(width, height) from the IHDR chunk, read before anything is decoded."""
    if len(data) < 33 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        raise PackError(pack, entry, "not a PNG file with an IHDR chunk")
    return struct.unpack(">II", data[16:24])


def _unfilter(raw, width, height, bpp, pack, entry):
    stride = width * bpp
    out = bytearray(height * stride)
    prev = bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        kind = raw[start]
        line = bytearray(raw[start + 1:start + 1 + stride])
        if kind == 1:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 255
        elif kind == 2:
            line = bytearray(map(lambda a, b: (a + b) & 255, line, prev))
        elif kind == 3:
            for i in range(stride):
                left = line[i - bpp] if i >= bpp else 0
                line[i] = (line[i] + ((left + prev[i]) >> 1)) & 255
        elif kind == 4:
            for i in range(stride):
                a = line[i - bpp] if i >= bpp else 0
                b = prev[i]
                c = prev[i - bpp] if i >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        elif kind != 0:
            raise PackError(pack, entry, f"PNG row {y} has filter type {kind}, not 0-4")
        out[y * stride:(y + 1) * stride] = line
        prev = line
    return out


def decode_png(data, pack, entry, width, height, colours):
    """Decodes an 8-bit, non-interlaced PNG whose IHDR must give `width` x `height` and a colour type in
    `colours`; returns (colour type, palette, samples). The size is checked before inflating, and the
    inflated data must be exactly height * (1 + width * channels) bytes."""
    w, h = png_header(data, pack, entry)
    if (w, h) != (width, height):
        raise PackError(pack, entry, f"PNG is {w} x {h}, expected {width} x {height} (the pack's resolution)")
    ihdr, palette, compressed = png_chunks(data, pack, entry)
    _, _, depth, colour, _, _, interlace = ihdr
    if depth != 8 or colour not in colours:
        raise PackError(pack, entry, f"PNG is {depth}-bit colour type {colour}; allowed: 8-bit types "
                                     f"{', '.join(map(str, sorted(colours)))}")
    if interlace != 0:
        raise PackError(pack, entry, "interlaced PNGs are not allowed in a pack")
    if colour == 3 and palette is None:
        raise PackError(pack, entry, "palette PNG without a PLTE chunk")
    bpp = CHANNELS[colour]
    expected = height * (1 + width * bpp)
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(compressed, expected)
    except zlib.error as error:
        raise PackError(pack, entry, f"PNG image data does not inflate: {error}") from None
    if len(raw) != expected or inflater.unconsumed_tail or not inflater.eof or inflater.unused_data:
        raise PackError(pack, entry, f"PNG image data is not the {expected} bytes its IHDR implies")
    return colour, palette, _unfilter(raw, width, height, bpp, pack, entry)


def decode_image(data, pack, entry, size):
    """An image entry as RGB bytes: palette expanded, grey replicated, alpha dropped."""
    colour, palette, samples = decode_png(data, pack, entry, size, size, {0, 2, 3, 4, 6})
    if colour == 2:
        return Image(size, size, bytes(samples))
    if colour == 6:
        rgb = bytearray(size * size * 3)
        for c in range(3):
            rgb[c::3] = samples[c::4]
        return Image(size, size, bytes(rgb))
    if colour == 3:
        entries = len(palette) // 3
        largest = max(samples)
        if largest >= entries:
            raise PackError(pack, entry, f"palette index {largest} is past the {entries}-entry palette")
        return Image(size, size, b"".join(palette[3 * i:3 * i + 3] for i in samples))
    grey = samples[::2] if colour == 4 else samples
    rgb = bytearray(size * size * 3)
    for c in range(3):
        rgb[c::3] = grey
    return Image(size, size, bytes(rgb))


def decode_label(data, pack, entry, size, classes):
    """A label entry's values, each a class id below `classes` or 255 (ignore)."""
    _, _, values = decode_png(data, pack, entry, size, size, {0, 3})
    allowed = bytes(range(min(classes, 256))) + b"\xff"
    if values.translate(None, allowed):
        position = next(i for i, v in enumerate(values) if v not in allowed)
        raise PackError(pack, entry, f"label value {values[position]} at x={position % size}, y={position // size} "
                                     f"is neither a teacher class id (0-{classes - 1}) nor 255 (ignore)")
    return Label(size, size, bytes(values))


# ---------------------------------------------------------------------------------------------------
# The manifest: types as the Swift Codable structs encode them, then the semantic rules.

class ManifestProblem(Exception):
    def __init__(self, field, problem):
        super().__init__(f"{field}: {problem}")
        self.field, self.problem = field, problem


INT64 = (-(1 << 63), (1 << 63) - 1)
FLOAT32_MAX = 3.4028234663852886e38


def _integer(lo=INT64[0], hi=INT64[1]):
    def check(value, field):
        if type(value) is not int:
            raise ManifestProblem(field, f"expected an integer, got {json.dumps(value)[:40]}")
        if not lo <= value <= hi:
            raise ManifestProblem(field, f"{value} is outside {lo}...{hi}")
        return value
    return check


def _number(limit):
    def check(value, field):
        if type(value) not in (int, float) or not math.isfinite(value) or abs(value) > limit:
            raise ManifestProblem(field, f"expected a finite number, got {json.dumps(value)[:40]}")
        return value
    return check


def _string(value, field):
    if type(value) is not str:
        raise ManifestProblem(field, f"expected a string, got {json.dumps(value)[:40]}")
    return value


def _boolean(value, field):
    if type(value) is not bool:
        raise ManifestProblem(field, f"expected true or false, got {json.dumps(value)[:40]}")
    return value


def _array(item):
    def check(value, field):
        if type(value) is not list:
            raise ManifestProblem(field, "expected an array")
        return [item(v, f"{field}[{i}]") for i, v in enumerate(value)]
    return check


def _map(item):
    def check(value, field):
        if type(value) is not dict:
            raise ManifestProblem(field, "expected an object")
        return {k: item(v, f"{field}.{k}") for k, v in value.items()}
    return check


def _object(required, optional=None):
    """An object with exactly these keys (optional ones may be absent or null, as Swift decodes them)."""
    optional = optional or {}

    def check(value, field):
        if type(value) is not dict:
            raise ManifestProblem(field or "manifest", "expected an object")
        prefix = f"{field}." if field else ""
        for key in value:
            if key not in required and key not in optional:
                raise ManifestProblem(prefix + key, "unknown field (fields are added only with a new formatVersion)")
        for key, item in required.items():
            if key not in value:
                raise ManifestProblem(prefix + key, "missing")
            item(value[key], prefix + key)
        for key, item in optional.items():
            if value.get(key) is not None:
                item(value[key], prefix + key)
        return value
    return check


INT = _integer()
UINT64 = _integer(0, (1 << 64) - 1)
FLOAT = _number(FLOAT32_MAX)
DOUBLE = _number(sys.float_info.max)
CLASS_INFO = _object({"id": INT, "name": _string})
INVERSION_OPTIONS = _object({
    "iterations": INT, "learningRate": FLOAT, "warmup": INT, "batchSize": INT, "resolution": INT, "jitter": INT,
    "flip": _boolean, "maxClasses": INT, "areaMin": FLOAT, "areaMax": FLOAT, "areaTotalMax": FLOAT, "margin": FLOAT,
    "absentFraction": FLOAT, "lambdaOut": FLOAT, "lambdaAbsent": FLOAT, "weightBN": FLOAT,
    "firstBNMultiplier": FLOAT, "weightTV2": FLOAT, "weightTV1": FLOAT, "weightL2": FLOAT, "warmStart": FLOAT},
    {"scaleAwareAggregation": _boolean})
ARCHITECTURE = _object({
    "name": _string, "flavor": _string, "block": _string, "layers": _array(INT), "baseWidth": INT,
    "outputStride": INT, "asppRates": _array(INT), "headChannels": INT, "auxHead": _boolean,
    "classesPerStep": _array(INT)})
MODEL_CARD = _object(
    {"format": _string, "formatVersion": INT, "architecture": ARCHITECTURE, "classes": _array(CLASS_INFO),
     "history": _array(_object({"step": INT, "classes": _array(INT)}, {"note": _string})),
     "normalization": _object({"mean": _array(FLOAT), "std": _array(FLOAT)}), "notes": _map(_string)},
    {"source": _object({"file": _string, "sha256": _string, "format": _string, "flavor": _string})})
SYNTHESIS_RECORD = _object({
    "index": INT, "image": _string, "label": _string, "targets": _array(INT), "targetAreas": _array(DOUBLE),
    "achievedAreas": _array(DOUBLE), "absentMaxArea": DOUBLE, "teacherConfidence": DOUBLE,
    "losses": _map(DOUBLE), "seed": UINT64, "batch": INT})
MANIFEST = _object(
    {"format": _string, "formatVersion": INT,
     "generator": _object({"name": _string, "version": _string, "options": INVERSION_OPTIONS, "seed": UINT64,
                           "count": INT}),
     "teacher": _object({"file": _string, "sha256": _string, "card": MODEL_CARD}),
     "classes": _array(CLASS_INFO), "images": _array(SYNTHESIS_RECORD),
     "quality": _object({"images": INT, "areaCorrelation": DOUBLE, "areaMeanAbsoluteDifference": DOUBLE,
                         "fidelity": DOUBLE, "meanConfidence": DOUBLE}, {"imagesPerMinute": DOUBLE})},
    {"shard": _object({"index": INT, "count": INT})})


def _refuse_duplicate_keys(pairs):
    keys = [k for k, _ in pairs]
    for key in keys:
        if keys.count(key) > 1:
            raise ManifestProblem(key, "appears twice in one object")
    return dict(pairs)


def _refuse_constant(name):
    raise ManifestProblem("manifest", f"{name} is not JSON")


def parse_manifest(data):
    """The manifest's JSON, refusing duplicate keys and NaN/Infinity. Raises ManifestProblem."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ManifestProblem("manifest", "not UTF-8") from None
    try:
        return json.loads(text, object_pairs_hook=_refuse_duplicate_keys, parse_constant=_refuse_constant)
    except ValueError as error:  # JSONDecodeError, or an integer of thousands of digits
        raise ManifestProblem("manifest", f"not JSON: {error}") from None
    except RecursionError:
        raise ManifestProblem("manifest", "nested too deeply") from None


def check_version(manifest):
    """format and formatVersion, checked before anything else so a newer pack is refused by its version."""
    if type(manifest) is not dict or manifest.get("format") != FORMAT_NAME:
        raise ManifestProblem("format", f"not \"{FORMAT_NAME}\": not a synthetic-pack manifest")
    version = manifest.get("formatVersion")
    if type(version) is not int or not 1 <= version <= FORMAT_VERSION:
        raise ManifestProblem("formatVersion", f"{json.dumps(version)} is not a version this reader reads "
                                               f"(1 to {FORMAT_VERSION})")


def _check_card(card):
    where = "teacher.card"
    if card["format"] != MODEL_FORMAT_NAME:
        raise ManifestProblem(f"{where}.format", f"not \"{MODEL_FORMAT_NAME}\"")
    if not 1 <= card["formatVersion"] <= MODEL_FORMAT_VERSION:
        raise ManifestProblem(f"{where}.formatVersion", f"{card['formatVersion']} is not 1 to {MODEL_FORMAT_VERSION}")
    arch = card["architecture"]
    rules = [
        ("flavor", arch["flavor"] in ("torchvision", "mib"), "must be torchvision or mib"),
        ("block", arch["block"] in ("bottleneck", "basic"), "must be bottleneck or basic"),
        ("layers", len(arch["layers"]) == 4 and all(n >= 1 for n in arch["layers"]), "must be four positive counts"),
        ("outputStride", arch["outputStride"] in (8, 16), "must be 8 or 16"),
        ("asppRates", len(arch["asppRates"]) == 3, "must be three rates"),
        ("baseWidth", arch["baseWidth"] >= 1, "must be positive"),
        ("headChannels", arch["headChannels"] >= 1, "must be positive"),
        ("classesPerStep", arch["classesPerStep"] and all(n >= 1 for n in arch["classesPerStep"]),
         "must be positive counts"),
        ("auxHead", not (arch["flavor"] == "mib" and arch["auxHead"]), "MiB models have no auxiliary head"),
    ]
    for field, holds, problem in rules:
        if not holds:
            raise ManifestProblem(f"{where}.architecture.{field}", problem)
    outputs = sum(arch["classesPerStep"])
    if len(card["classes"]) != outputs:
        raise ManifestProblem(f"{where}.classes", f"{len(card['classes'])} classes for {outputs} outputs")
    for position, info in enumerate(card["classes"]):
        if info["id"] != position:
            raise ManifestProblem(f"{where}.classes[{position}].id", f"{info['id']}, expected {position}")
    norm = card["normalization"]
    if len(norm["mean"]) != 3 or len(norm["std"]) != 3 or not all(s > 0 for s in norm["std"]):
        raise ManifestProblem(f"{where}.normalization", "needs three means and three positive deviations")


def check_manifest(manifest):
    """Every rule of docs/pack-format.md on the manifest alone. Raises ManifestProblem naming the field."""
    check_version(manifest)
    MANIFEST(manifest, "")
    teacher = manifest["teacher"]
    if not SHA256_HEX.match(teacher["sha256"]):
        raise ManifestProblem("teacher.sha256", "not 64 lowercase hex digits")
    _check_card(teacher["card"])
    names = {c["id"]: c["name"] for c in teacher["card"]["classes"]}
    pack_classes = set()
    for i, info in enumerate(manifest["classes"]):
        field = f"classes[{i}]"
        if info["id"] == 0:
            raise ManifestProblem(f"{field}.id", "background (0) is not a pack class")
        if names.get(info["id"]) != info["name"]:
            raise ManifestProblem(field, f"class {info['id']} \"{info['name']}\" is not in the teacher's classes")
        if info["id"] in pack_classes:
            raise ManifestProblem(f"{field}.id", f"class {info['id']} is listed twice")
        pack_classes.add(info["id"])
    generator = manifest["generator"]
    options = generator["options"]
    # hrhf-synth draws 1 ... min(maxClasses, classes) targets and records the option as given.
    if options["maxClasses"] < 1:
        raise ManifestProblem("generator.options.maxClasses", f"{options['maxClasses']} is below 1")
    if not 1 <= options["resolution"] <= MAX_RESOLUTION:
        raise ManifestProblem("generator.options.resolution", f"{options['resolution']} is outside "
                                                              f"1...{MAX_RESOLUTION}")
    if generator["count"] < 0:
        raise ManifestProblem("generator.count", "is negative")
    shard = manifest.get("shard")
    if shard is not None and not 1 <= shard["index"] <= shard["count"]:
        raise ManifestProblem("shard", f"index {shard['index']} of {shard['count']} is not in 1...count")
    indices = set()
    for i, record in enumerate(manifest["images"]):
        _check_record(record, f"images[{i}]", options["maxClasses"], pack_classes, generator["count"])
        if record["index"] in indices:
            raise ManifestProblem(f"images[{i}].index", f"{record['index']} appears twice")
        indices.add(record["index"])
    if shard is None and len(indices) != generator["count"]:
        raise ManifestProblem("images", f"{len(indices)} records for a whole pack of generator.count "
                                        f"{generator['count']}")


def _check_record(record, field, max_classes, pack_classes, count):
    targets = record["targets"]
    if not 1 <= len(targets) <= max_classes:
        raise ManifestProblem(f"{field}.targets", f"{len(targets)} targets, allowed 1...{max_classes}")
    for key in ("targetAreas", "achievedAreas"):
        if len(record[key]) != len(targets):
            raise ManifestProblem(f"{field}.{key}", f"{len(record[key])} values for {len(targets)} targets")
        for j, area in enumerate(record[key]):
            if not 0 <= area <= 1:
                raise ManifestProblem(f"{field}.{key}[{j}]", f"{area} is outside [0, 1]")
    for j, target in enumerate(targets):
        if target not in pack_classes:
            raise ManifestProblem(f"{field}.targets[{j}]", f"{target} is not one of the pack's classes")
    if len(set(targets)) != len(targets):
        raise ManifestProblem(f"{field}.targets", "a class appears twice")
    for key in ("absentMaxArea", "teacherConfidence"):
        if not 0 <= record[key] <= 1:
            raise ManifestProblem(f"{field}.{key}", f"{record[key]} is outside [0, 1]")
    index = record["index"]
    if not 0 <= index < count:
        raise ManifestProblem(f"{field}.index", f"{index} is outside 0...{count - 1} (generator.count {count})")
    for key, folder in (("image", "images"), ("label", "labels")):
        expected = f"{folder}/{index:06d}.png"
        if record[key] != expected:
            raise ManifestProblem(f"{field}.{key}", f"{shown(record[key])}, expected {expected} for index {index}")


# ---------------------------------------------------------------------------------------------------
# The pack.

def parse_sums(data, pack):
    """SHA256SUMS as {name: digest}: each line 64 lowercase hex digits, two spaces, a name, then LF."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise PackError(pack, "SHA256SUMS", "not UTF-8") from None
    if not text.endswith("\n"):
        raise PackError(pack, "SHA256SUMS", "does not end with a line feed")
    sums = {}
    for number, line in enumerate(text[:-1].split("\n"), 1):
        match = SUMS_LINE.match(line)
        if not match:
            raise PackError(pack, "SHA256SUMS", f"line {number} is not '<64 lowercase hex digits>  <name>'")
        digest, name = match.groups()
        if not ENTRY_NAME.match(name):
            raise PackError(pack, "SHA256SUMS", f"line {number} names {shown(name)}, not a pack entry name")
        if name in sums:
            raise PackError(pack, "SHA256SUMS", f"lists {shown(name)} twice")
        sums[name] = digest
    return sums


class Pack:
    """A verified pack. Opening it runs every check of docs/pack-format.md (raising PackError); entries are
    then read by offset, and each read is checked against its verified SHA-256 again."""

    def __init__(self, path, entry_limit=ENTRY_LIMIT, total_limit=TOTAL_LIMIT):
        self.path = os.fspath(path)
        try:
            self._stream = open(self.path, "rb")
        except OSError as error:
            raise PackError(self.path, None, f"cannot open: {error.strerror}") from None
        try:
            self._verify(entry_limit, total_limit)
        except BaseException:
            self._stream.close()
            raise

    def close(self):
        self._stream.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _verify(self, entry_limit, total_limit):
        pack = self.path
        entries, order, digests = {}, [], {}
        for entry in scan_tar(pack, self._stream, entry_limit, total_limit):
            if not order and entry.name != "manifest.json":
                raise PackError(pack, entry.name, "is the first entry; manifest.json must be")
            if order and order[-1] == "SHA256SUMS":
                raise PackError(pack, entry.name, "follows SHA256SUMS, which must be the last entry")
            if entry.name in entries:
                raise PackError(pack, entry.name, "appears twice")
            entries[entry.name] = entry
            order.append(entry.name)
            data = read_at(self._stream, entry, pack)
            digests[entry.name] = hashlib.sha256(data).hexdigest()
            if len(order) == 1:
                # The version decides what else a pack may hold, so it is checked before any other entry.
                manifest = _in_manifest(pack, parse_manifest, data)
                _in_manifest(pack, check_version, manifest)
        if not order:
            raise PackError(pack, "manifest.json", "missing: the archive is empty")
        if order[-1] != "SHA256SUMS":
            raise PackError(pack, "SHA256SUMS", "missing: it must be the last entry")
        sums = parse_sums(read_at(self._stream, entries["SHA256SUMS"], pack), pack)
        for name, digest in sums.items():
            if name not in entries or name == "SHA256SUMS":
                raise PackError(pack, shown(name), "listed in SHA256SUMS but not an entry of the pack")
            if digests[name] != digest:
                raise PackError(pack, name, "checksum mismatch: the entry is damaged")
        for name in order[:-1]:
            if name not in sums:
                raise PackError(pack, name, "not listed in SHA256SUMS")
        _in_manifest(pack, check_manifest, manifest)
        named = set()
        for record in manifest["images"]:
            for key in ("image", "label"):
                if record[key] not in entries:
                    raise PackError(pack, record[key], f"named by the manifest (index {record['index']}) but absent")
                named.add(record[key])
        for name in order:
            if name.startswith(("images/", "labels/")) and name not in named:
                raise PackError(pack, name, "not named by any record of the manifest")
        self.manifest = manifest
        self.records = sorted(manifest["images"], key=lambda r: r["index"])
        self.resolution = manifest["generator"]["options"]["resolution"]
        self.teacher_classes = len(manifest["teacher"]["card"]["classes"])
        self._entries, self._digests, self.order = entries, digests, order
        for record in self.records:
            self.image(record)
            self.label(record)

    def read(self, name):
        """An entry's bytes, its checksum checked again (the file may have changed since it was opened)."""
        entry = self._entries.get(name)
        if entry is None:
            raise PackError(self.path, shown(name), "no such entry")
        data = read_at(self._stream, entry, self.path)
        if hashlib.sha256(data).hexdigest() != self._digests[name]:
            raise PackError(self.path, name, "checksum mismatch: the pack changed after it was verified")
        return data

    def image(self, record):
        return decode_image(self.read(record["image"]), self.path, record["image"], self.resolution)

    def label(self, record):
        return decode_label(self.read(record["label"]), self.path, record["label"], self.resolution,
                            self.teacher_classes)

    def __len__(self):
        return len(self.records)

    def __getitem__(self, position):
        record = self.records[position]
        return self.image(record), self.label(record), record

    def __iter__(self):
        for position in range(len(self.records)):
            yield self[position]

    def arrays(self):
        """(image H x W x 3 uint8, label H x W uint8, record) as NumPy arrays; needs numpy."""
        import numpy
        for position in range(len(self.records)):
            yield as_arrays(self[position], numpy)

    def extract(self, directory):
        """Writes every entry under `directory` (which must exist), each to NAME.partial then renamed into
        place; only the pack's fixed names are written, and no symbolic link is followed below `directory`."""
        folders = {}
        name = "."
        try:
            folders[""] = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            for name in ("images", "labels"):
                try:
                    os.mkdir(name, 0o755, dir_fd=folders[""])
                except FileExistsError:
                    pass
                folders[name] = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=folders[""])
            for name in self.order:
                folder, _, base = name.rpartition("/")
                _write_atomically(self.read(name), base, folders[folder])
        except OSError as error:
            where = os.path.join(directory, name)
            raise PackError(self.path, name, f"cannot write {where}: {error.strerror}") from None
        finally:
            for descriptor in folders.values():
                os.close(descriptor)


def _in_manifest(pack, check, value):
    """check(value), its ManifestProblem turned into the PackError naming the field."""
    try:
        return check(value)
    except ManifestProblem as problem:
        raise PackError(pack, f"manifest.json: {problem.field}", problem.problem) from None


def as_arrays(sample, numpy):
    image, label, record = sample
    pixels = numpy.frombuffer(image.pixels, dtype=numpy.uint8).reshape(image.height, image.width, 3)
    values = numpy.frombuffer(label.values, dtype=numpy.uint8).reshape(label.height, label.width)
    return pixels, values, record


def _write_atomically(data, name, folder):
    partial = name + ".partial"
    try:
        os.unlink(partial, dir_fd=folder)
    except FileNotFoundError:
        pass
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=folder)
    try:
        with os.fdopen(descriptor, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, name, src_dir_fd=folder, dst_dir_fd=folder)
    except BaseException:
        os.unlink(partial, dir_fd=folder)
        raise


try:
    import numpy as _numpy
    import torch as _torch
    from torch.utils.data import Dataset as _Dataset
except ImportError:
    pass
else:
    class PackDataset(_Dataset):
        """A verified pack as a torch Dataset of (image 3 x H x W uint8, label H x W int64, record)."""

        def __init__(self, path, transform=None):
            self.pack = Pack(path)
            self.transform = transform

        def __len__(self):
            return len(self.pack)

        def __getitem__(self, position):
            pixels, values, record = as_arrays(self.pack[position], _numpy)
            image = _torch.from_numpy(pixels.transpose(2, 0, 1).copy())
            label = _torch.from_numpy(values.astype(_numpy.int64))
            if self.transform is not None:
                image, label = self.transform(image, label)
            return image, label, record


# ---------------------------------------------------------------------------------------------------
# The command.

def inspect_text(pack):
    m = pack.manifest
    generator, teacher = m["generator"], m["teacher"]
    lines = [
        f"pack            {pack.path}",
        f"format          {m['format']} {m['formatVersion']}",
        f"generator       {generator['name']} {generator['version']}, seed {generator['seed']}",
        f"images          {len(pack.records)} of {generator['count']}"
        + (f" (shard {m['shard']['index']}/{m['shard']['count']})" if m.get("shard") else ""),
        f"resolution      {pack.resolution}",
        f"teacher         {teacher['file']} ({teacher['card']['architecture']['name']}, "
        f"{pack.teacher_classes} classes)",
        f"teacher SHA-256 {teacher['sha256']}",
        "",
        "id  class                 images",
    ]
    for info in m["classes"]:
        count = sum(info["id"] in r["targets"] for r in pack.records)
        lines.append(f"{info['id']:<3} {info['name'][:21]:<21} {count}")
    lines.append("")
    for key, value in sorted(m["quality"].items()):
        lines.append(f"{key:<27} {value}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="hrhf_pack.py", description="Verify, inspect or extract an HRHF "
                                     "synthetic pack (docs/pack-format.md).")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("verify", "check every entry, checksum and manifest rule"),
                            ("inspect", "verify, then print generator, teacher, classes and quality"),
                            ("extract", "verify, then write the entries under DIR")):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("pack")
        if name == "extract":
            command.add_argument("dir")
    args = parser.parse_args(argv)
    try:
        with Pack(args.pack) as pack:
            if args.command == "verify":
                print(f"{args.pack}: OK, {len(pack.records)} images, {len(pack.order)} entries, checksums match")
            elif args.command == "inspect":
                print(inspect_text(pack))
            else:
                pack.extract(args.dir)
                print(f"{args.pack}: extracted {len(pack.order)} entries to {args.dir}")
    except PackError as error:
        print(f"hrhf_pack.py: error: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"hrhf_pack.py: error: {error.filename or args.pack}: {error.strerror}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
