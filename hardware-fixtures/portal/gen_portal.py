#!/usr/bin/env python3
"""Generate scangate fixtures for repeat suppression and zone arbitration: timed captures of
RFID portals (scangate-capture v1 serial) plus ground-truth pass labels.

    python3 gen_portal.py      # (re)writes the scenario folders next to this file

Python 3 standard library only, fixed seeds: the output is byte-for-byte reproducible.
Written from hardware-fixtures/README.md (capture format) and REFERENCE-READERS.md section 4
(uhf-bb frames); it does not use scangate's code. See README.md next to this file for the
model, the formats, the scenarios and the label rule.

After writing, the script parses every capture back with its own small decoders, checks every
uhf-bb frame (header, type/cmd, PL, sum, end byte, PC, Gen2 tag CRC), checks that the decoded
reads equal the generated ones, and checks every read against the labels.
"""

import math
import os
import random
import sys

OUT = os.path.dirname(os.path.abspath(__file__))
SEED = 20250611
MAX_FILE = 2 * 1024 * 1024

# ---- model constants (README.md "Model") -------------------------------------------------
BELT_M_PER_MS = 0.001          # 1.0 m/s
X_A, X_B = 0.0, 3.0            # portal positions (m)
FIELD_M = 1.8                  # read range of each portal reader
X_ENTER = -2.5                 # bags enter the belt here
BAG_EVERY_MS = 2500
MEAN_GAP_MS = 25.0             # ~40 reads/s per reader per tag
CAP_GAP_MS = 250.0
RSSI_SIGMA = 2.0
B_WINDOW_MS = 20               # reader B: frames written within each 20 ms form one record


# ============================================================================================
# helpers
# ============================================================================================

def expo(rng, mean):
    """exponential variate, own formula (stable across Python versions)"""
    return -math.log(1.0 - rng.random()) * mean


def gap(rng, mean=MEAN_GAP_MS):
    return min(expo(rng, mean), CAP_GAP_MS)


def clamp(v, lo, hi):
    return max(lo, min(hi, v))


def rssi_model(rng, dist, offset_db=0.0, lo=-90.0, hi=-30.0):
    return clamp(-45.0 - 12.0 * abs(dist) + offset_db + rng.gauss(0.0, RSSI_SIGMA), lo, hi)


def round_half_db(v):
    return math.floor(v * 2.0 + 0.5) / 2.0


def round_db(v):
    return int(math.floor(v + 0.5))


def crc16_msb(data, init, poly=0x1021):
    crc = init
    for b in data:
        crc ^= b << 8
        for _ in range(8):
            crc = ((crc << 1) ^ poly) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
    return crc


def gen2_crc(data):
    """EPC Gen2 StoredCRC = CRC-16/GENIBUS over PC+EPC (realistic tag-CRC bytes)"""
    return crc16_msb(data, 0xFFFF) ^ 0xFFFF


def bb_sum(data):
    return sum(data) & 0xFF


def verify_vectors():
    assert gen2_crc(b"123456789") == 0xD64E, "CRC-16/GENIBUS check value"
    m100 = bytes.fromhex("BB 02 22 00 11 C9 34 00 30 75 1F EB 70 5C 59 04 E3 D5 0D 70 3A 76 EF 7E".replace(" ", ""))
    assert len(m100) == ((m100[3] << 8) | m100[4]) + 7 and bb_sum(m100[1:-2]) == m100[-2] == 0xEF
    assert gen2_crc(m100[6:8] + m100[8:20]) == 0x3A76, "Gen2 CRC of the M100 example"
    assert m100[5] - 256 == -55
    for f in ("BB00220000227E", "BB0027000322271083 7E".replace(" ", ""), "BB01FF000115167E"):
        b = bytes.fromhex(f)
        assert bb_sum(b[1:-2]) == b[-2]


PC_96 = 0x3000  # Gen2 PC: 6 EPC words (96 bits), no UMI/XPC


def bb_notice(rssi_dbm, epc):
    assert len(epc) == 12 and -128 <= rssi_dbm <= 127
    pc = PC_96.to_bytes(2, "big")
    param = bytes([rssi_dbm & 0xFF]) + pc + epc + gen2_crc(pc + epc).to_bytes(2, "big")
    body = bytes([0x02, 0x22]) + len(param).to_bytes(2, "big") + param
    return b"\xBB" + body + bytes([bb_sum(body), 0x7E])


EPCS_SEEN = set()


def new_epc(rng):
    """distinct 96-bit EPC, SGTIN-96 style header 0x30, 24 uppercase hex digits"""
    while True:
        e = "30" + "".join("%02X" % rng.randrange(256) for _ in range(11))
        if e not in EPCS_SEEN:
            EPCS_SEEN.add(e)
            return e


def escape_text(b):
    out = []
    for c in b:
        if c == 0x0D:
            out.append("\\r")
        elif c == 0x0A:
            out.append("\\n")
        elif c == 0x09:
            out.append("\\t")
        elif c == 0x5C:
            out.append("\\\\")
        elif 0x20 <= c < 0x7F:
            out.append(chr(c))
        else:
            out.append("\\x%02X" % c)
    return "".join(out)


def wrap(text, width=94):
    out, line = [], ""
    for w in text.split():
        if line and len(line) + len(w) + 1 > width:
            out.append(line)
            line = w
        else:
            line = (line + " " + w).strip()
    if line:
        out.append(line)
    return out


# ============================================================================================
# reads -> captures
# ============================================================================================
# A read: dict(tag, reader 'a'|'b', t (physical ms, float), cap (capture offset ms, int),
#              rssi (reported: float for a, int for b), ant (int for a, None for b))

def cap_time_a(t):
    return int(math.ceil(t))


def cap_time_b(t):
    return int(math.ceil(t / B_WINDOW_MS)) * B_WINDOW_MS


def text_line(r):
    return ("%s,%.1f,%d\r\n" % (r["tag"], r["rssi"], r["ant"])).encode("ascii")


def write_capture(path, header_paras, records, kind):
    lines = ["scangate-capture v1 serial"]
    for p in header_paras:
        if isinstance(p, (list, tuple)):
            for q in p:
                ww = wrap(q, 92)
                lines.append("# - " + ww[0])
                lines += ["#   " + x for x in ww[1:]]
        elif p == "":
            lines.append("#")
        else:
            lines += ["# " + x for x in wrap(p)]
    last = 0
    for t, data in records:
        assert t >= last
        last = t
        if kind == "text":
            lines.append("%d text %s" % (t, escape_text(data)))
        else:
            lines.append("%d hex %s" % (t, data.hex().upper()))
    with open(path, "w", newline="\n") as f:
        f.write("\n".join(lines) + "\n")


def records_a(reads):
    """reader A: one record per line, offset = capture time"""
    return [(r["cap"], text_line(r)) for r in reads]


def records_b(reads):
    """reader B: frames written within each 20 ms window form one record at the window's end"""
    recs = []
    for r in reads:
        fr = bb_notice(r["rssi"], bytes.fromhex(r["tag"]))
        if recs and recs[-1][0] == r["cap"]:
            recs[-1] = (r["cap"], recs[-1][1] + fr)
        else:
            recs.append((r["cap"], fr))
    return recs


def sort_reads(reads):
    reads.sort(key=lambda r: (r["t"], r["tag"]))
    return reads


# ============================================================================================
# independent parse-back (self-check)
# ============================================================================================

def unescape(s):
    out, i = bytearray(), 0
    while i < len(s):
        c = s[i]
        if c == "\\":
            n = s[i + 1]
            if n == "x":
                out.append(int(s[i + 2:i + 4], 16))
                i += 4
                continue
            out += {"r": b"\r", "n": b"\n", "t": b"\t", "\\": b"\\"}[n]
            i += 2
            continue
        out += c.encode("utf-8")
        i += 1
    return bytes(out)


def parse_capture(path):
    recs, header, last = [], None, -1
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line or line.startswith("#"):
                continue
            if header is None:
                header = line
                assert header == "scangate-capture v1 serial", header
                continue
            t, kind, rest = line.split(" ", 2)
            t = int(t)
            assert t >= last, "offsets non-decreasing"
            last = t
            if kind == "hex":
                recs.append((t, bytes.fromhex(rest.replace(" ", ""))))
            else:
                assert kind == "text"
                recs.append((t, unescape(rest)))
    return recs


def decode_a(recs):
    """text reader: each record must be exactly one CRLF-terminated EPC,RSSI,ANT line"""
    out = []
    for t, data in recs:
        assert data.endswith(b"\r\n") and data.count(b"\n") == 1, data
        tag, rssi, ant = data[:-2].decode("ascii").split(",")
        assert len(tag) == 24 and tag == tag.upper() and int(tag, 16) >= 0
        assert len(rssi.split(".")[1]) == 1 and float(rssi) * 2 == int(float(rssi) * 2)
        assert ant in ("1", "2")
        out.append((t, tag, float(rssi), int(ant)))
    return out


def decode_b(recs):
    """uhf-bb: frame on PL and the sum; a frame's time = offset of the record holding its last byte"""
    stream, ends = bytearray(), []
    for t, data in recs:
        stream += data
        ends.append((len(stream), t))
    out, i, k = [], 0, 0
    while i < len(stream):
        assert stream[i] == 0xBB, "garbage at %d" % i
        pl = (stream[i + 3] << 8) | stream[i + 4]
        f = bytes(stream[i:i + pl + 7])
        assert len(f) == pl + 7 and f[-1] == 0x7E, "truncated / bad end"
        assert bb_sum(f[1:-2]) == f[-2], "bad checksum at %d" % i
        assert f[1] == 0x02 and f[2] == 0x22 and pl == 17, "tag notice with 96-bit EPC"
        param = f[5:-2]
        rssi = param[0] - 256 if param[0] >= 128 else param[0]
        pc, epc, tcrc = param[1:3], param[3:-2], param[-2:]
        assert int.from_bytes(pc, "big") == PC_96
        assert int.from_bytes(tcrc, "big") == gen2_crc(pc + epc)
        end = i + len(f)
        while ends[k][0] < end:
            k += 1
        out.append((ends[k][1], epc.hex().upper(), rssi, None))
        i = end
    return out


def read_labels(path):
    labels = []
    with open(path) as f:
        for line in f:
            tag, zone, a, b = line.rstrip("\n").split("\t")
            labels.append((tag, zone, int(a), int(b)))
    return labels


# ============================================================================================
# scenarios
# ============================================================================================

def belt_x(t, t_enter):
    return X_ENTER + (t - t_enter) * BELT_M_PER_MS


def t_at(x, t_enter):
    """ms at which a bag that entered at t_enter is at x (exact integers for the model's numbers)"""
    v = t_enter + (x - X_ENTER) / BELT_M_PER_MS
    assert abs(v - round(v)) < 1e-6
    return int(round(v))


def reads_in(rng, lo, hi, first_at_lo=False, mean=MEAN_GAP_MS):
    """read times in (lo, hi]: exponential gaps (mean), each capped at 250 ms"""
    ts, t = [], lo
    if first_at_lo:
        ts.append(lo)
    while True:
        t += gap(rng, mean)
        if t > hi:
            return ts
        ts.append(t)


def two_portals(n=200, seed=SEED + 1):
    rng = random.Random(seed)
    bags, reads, labels = [], [], []
    for i in range(n):
        bags.append((new_epc(rng), i * BAG_EVERY_MS))
    for tag, te in bags:
        # reader A (text): in field while |x - 0| <= 1.8
        for t in reads_in(rng, t_at(X_A - FIELD_M, te), t_at(X_A + FIELD_M, te)):
            d = belt_x(t, te) - X_A
            reads.append(dict(tag=tag, reader="a", t=t, cap=cap_time_a(t),
                              rssi=round_half_db(rssi_model(rng, d)), ant=rng.choice((1, 2))))
        # reader B (uhf-bb)
        for t in reads_in(rng, t_at(X_B - FIELD_M, te), t_at(X_B + FIELD_M, te)):
            d = belt_x(t, te) - X_B
            reads.append(dict(tag=tag, reader="b", t=t, cap=cap_time_b(t),
                              rssi=round_db(rssi_model(rng, d)), ant=None))
        mid = (X_A + X_B) / 2
        labels.append((tag, "A", t_at(X_A - FIELD_M, te), t_at(mid, te)))
        labels.append((tag, "B", t_at(mid, te), t_at(X_B + FIELD_M, te)))
    labels.sort(key=lambda l: (l[2], l[1]))
    return bags, reads, labels


def parked():
    rng = random.Random(SEED + 2)
    tag = new_epc(rng)
    reads = []
    for t in reads_in(rng, 0, 600000, first_at_lo=True):
        reads.append(dict(tag=tag, reader="a", t=t, cap=cap_time_a(t),
                          rssi=round_half_db(rssi_model(rng, 0.5)), ant=rng.choice((1, 2))))
    return tag, reads, [(tag, "A", 0, 600000)]


def one_belt_two_antennas():
    rng = random.Random(SEED + 3)
    reads, labels, bags = [], [], []
    for i in range(100):
        bags.append((new_epc(rng), i * BAG_EVERY_MS))
    for tag, te in bags:
        lo, hi = t_at(X_A - 1.5, te), t_at(X_A + 1.5, te)
        for t in reads_in(rng, lo, hi):
            ant = rng.choice((1, 2))
            d = belt_x(t, te) - X_A
            r = rssi_model(rng, d, offset_db=(-3.0 if ant == 2 else 0.0))
            reads.append(dict(tag=tag, reader="a", t=t, cap=cap_time_a(t), rssi=round_half_db(r), ant=ant))
        labels.append((tag, "A", lo, hi))
    labels.sort(key=lambda l: l[2])
    return bags, reads, labels


def dense():
    rng = random.Random(SEED + 4)
    n, nreads, period = 300, 2000, 2.0
    tags = [new_epc(rng) for _ in range(n)]
    base = [rng.uniform(-68.0, -50.0) for _ in range(n)]          # parked-cart RSSI per tag
    pread = [0.75 + 0.23 * (b + 68.0) / 18.0 for b in base]       # weaker tags miss more rounds
    order, missed = [], [0] * n
    while len(order) < nreads:                                    # Gen2 inventory rounds
        perm = list(range(n))
        rng.shuffle(perm)
        for i in perm:
            if missed[i] >= 1 or rng.random() < pread[i]:        # never 2 rounds in a row missed
                order.append(i)
                missed[i] = 0
            else:
                missed[i] += 1
    order = order[:nreads]
    reads = []
    for k, i in enumerate(order):
        t = k * period + rng.uniform(0.0, period * 0.95)
        moved = max(0.0, (t - 2000.0) * 0.0005)                  # cart leaves at 0.5 m/s after 2 s
        r = clamp(base[i] - 12.0 * moved + rng.gauss(0.0, RSSI_SIGMA), -80.0, -50.0)
        reads.append(dict(tag=tags[i], reader="b", t=t, cap=cap_time_b(t), rssi=round_db(r), ant=None))
    labels = [(tg, "B", 0, 4000) for tg in tags]
    return tags, reads, labels


# ============================================================================================
# writing and checking
# ============================================================================================

PROV = ("Synthetic, not a field recording: generated by gen_portal.py (Python standard library,"
        " random seed %d). Model, label rule and formats: README.md of this fixture set.")
HDR_A = ("Reader A: text-mode UHF reader, 115200 8N1 (assumed; 9600 cannot carry 40 reads/s per tag),"
         " one line per read `EPC,RSSI,ANTENNA` + CRLF, RSSI in dBm to 0.5 dB, antenna 1|2. One record"
         " per line, offset = ceil(read time) in ms. scangate source: protocol = \"lines\","
         " fields = [\"tag\", \"rssi\", \"antenna\"], separator = \",\".")
HDR_B = ("Reader B: \"BB ... 7E\" UHF module (uhf-bb), %d 8N1%s; every read is a tag notice BB 02 22 00 11"
         " RSSI(i8 dBm) PC(3000) EPC(12) tagCRC(Gen2 CRC-16 of PC+EPC) sum 7E, written without spaces."
         " Frames written within each 20 ms window (k*20-20, k*20] form one record at offset k*20."
         " scangate source: protocol = \"uhf-bb\".")


def dump_tsv(path, rows):
    with open(path, "w", newline="\n") as f:
        for r in rows:
            f.write("\t".join(str(x) for x in r) + "\n")


def read_counts(reads):
    d = {}
    for r in reads:
        k = (r["tag"], r["reader"])
        c = d.setdefault(k, [0, r["cap"], r["cap"]])
        c[0] += 1
        c[1] = min(c[1], r["cap"])
        c[2] = max(c[2], r["cap"])
    rows = [(k[0], k[1], v[0], v[1], v[2]) for k, v in d.items()]
    rows.sort(key=lambda x: (x[3], x[1], x[0]))
    return rows


def write_scenario(name, reads, labels, headers):
    d = os.path.join(OUT, name)
    os.makedirs(d, exist_ok=True)
    for reader in ("a", "b"):
        rs = sort_reads([r for r in reads if r["reader"] == reader])
        if not rs:
            continue
        recs = records_a(rs) if reader == "a" else records_b(rs)
        write_capture(os.path.join(d, reader + ".cap"), headers[reader], recs,
                      "text" if reader == "a" else "hex")
    dump_tsv(os.path.join(d, "labels.tsv"), labels)
    dump_tsv(os.path.join(d, "read_counts.tsv"), read_counts(reads))


ZONE = {"a": "A", "b": "B"}


def check_scenario(name, reads, overlap=None, window_ms=2000):
    """parse back, compare with the generated reads, check every read against the labels.
    overlap: per tag, the closed capture-time band in which both portals see the bag."""
    d = os.path.join(OUT, name)
    labels = read_labels(os.path.join(d, "labels.tsv"))
    by_tag = {}
    for tag, zone, a, b in labels:
        assert a <= b
        by_tag.setdefault(tag, []).append((zone, a, b))
    stats = {}
    for reader in ("a", "b"):
        path = os.path.join(d, reader + ".cap")
        gen = sort_reads([r for r in reads if r["reader"] == reader])
        if not gen:
            assert not os.path.exists(path)
            continue
        recs = parse_capture(path)
        got = decode_a(recs) if reader == "a" else decode_b(recs)
        want = [(r["cap"], r["tag"], float(r["rssi"]) if reader == "a" else r["rssi"], r["ant"]) for r in gen]
        assert got == want, "%s/%s.cap does not decode to the generated reads" % (name, reader)
        if reader == "b":
            assert all(t % B_WINDOW_MS == 0 for t, _ in recs)
            assert all(a < b for (a, _), (b, _) in zip(recs, recs[1:])), "one record per window"
        own = band = band_other = maxgap = 0
        last_seen = {}
        for t, tag, rssi, ant in got:
            in_own = any(z == ZONE[reader] and a <= t <= b for z, a, b in by_tag[tag])
            in_band = overlap is not None and overlap[tag][0] <= t <= overlap[tag][1]
            assert in_own or in_band, (name, reader, t, tag)
            own += in_own
            band += in_band
            band_other += in_band and not in_own
            if reader == "a":
                assert -90.0 <= rssi <= -30.0
            else:
                assert -90 <= rssi <= -30
            # while a tag is in the field the reader never goes quiet for window_ms
            if tag in last_seen:
                maxgap = max(maxgap, t - last_seen[tag])
            last_seen[tag] = t
        assert maxgap < window_ms, (name, reader, maxgap)
        stats[reader] = dict(max_gap_ms=maxgap, reads=len(got), records=len(recs), in_own_pass=own, in_overlap_band=band,
                             in_band_outside_own_pass=band_other, tags=len(set(g[1] for g in got)))
    for fn in os.listdir(d):
        assert os.path.getsize(os.path.join(d, fn)) < MAX_FILE, fn
    return stats


def main():
    verify_vectors()
    results = {}

    # ---- 1. two-portals
    bags, reads, labels = two_portals()
    p = PROV % (SEED + 1)
    common = ("Scenario two-portals: baggage belt at 1.0 m/s, portal A at x = 0 m (text reader), portal B"
              " at x = 3 m (uhf-bb module); each reads a tag within 1.8 m (fields overlap at x = 1.2..1.8 m)."
              " 200 bags with distinct 96-bit EPCs enter at x = -2.5 m every 2500 ms, the first at 0 ms;"
              " ~40 reads/s per reader per tag (exponential gaps, mean 25 ms, capped at 250 ms); RSSI ="
              " -45 - 12*distance + N(0, 2 dB), clamped to -90..-30. Truth: labels.tsv.")
    write_scenario("two-portals", reads, labels, {
        "a": [common, "", p, "", HDR_A],
        "b": [common, "", p, "", HDR_B % (115200, "")]})
    overlap = {tag: (t_at(X_B - FIELD_M, te), t_at(X_A + FIELD_M, te)) for tag, te in bags}
    results["two-portals"] = check_scenario("two-portals", reads, overlap)
    labs = read_labels(os.path.join(OUT, "two-portals", "labels.tsv"))
    assert len(labs) == 400 and all(
        [z for tg, z, _, _ in labs if tg == tag] == ["A", "B"] for tag, _ in bags)

    # ---- 2. parked
    tag, reads, labels = parked()
    write_scenario("parked", reads, labels, {"a": [
        "Scenario parked: one tag parked 0.5 m from portal A for 10 minutes (0..600000 ms), read by A"
        " only at ~40 reads/s (exponential gaps, mean 25 ms, capped at 250 ms; the reader is already"
        " reading when the capture starts, so the first read is at 0 ms), antenna 1|2 at random, RSSI"
        " -51 dBm + N(0, 2 dB). With [suppress] max_pass_ms = 60000 scangate must emit 10 passes.",
        "", PROV % (SEED + 2), "", HDR_A]})
    results["parked"] = check_scenario("parked", reads)
    rs = sorted(r["cap"] for r in reads)
    assert rs[0] == 0 and rs[-1] > 600000 - 250 and rs[-1] <= 600000
    # 10 passes under "a pass is emitted when it would exceed max_pass_ms" whatever the boundary rule
    for incl in (True, False):
        passes, start = 0, None
        for t in rs:
            if start is None or (t - start > 60000 if incl else t - start >= 60000):
                passes, start = passes + 1, t
        assert passes == 10, (incl, passes)

    # ---- 3. one-belt-two-antennas
    bags3, reads, labels = one_belt_two_antennas()
    write_scenario("one-belt-two-antennas", reads, labels, {"a": [
        "Scenario one-belt-two-antennas: one text reader (as reader A) with antenna 1 and antenna 2 on"
        " both sides of one belt at x = 0 (one zone, A). 100 bags with distinct 96-bit EPCs enter at"
        " x = -2.5 m every 2500 ms at 1.0 m/s; a bag is read while within 1.5 m (x = -1.5..1.5) at ~40"
        " reads/s by the reader, each read on antenna 1 or 2 at random (the reader multiplexes its"
        " ports), RSSI = -45 - 12*|x| + N(0, 2 dB) per read, 3 dB less on antenna 2.",
        "", PROV % (SEED + 3), "", HDR_A]})
    results["one-belt-two-antennas"] = check_scenario("one-belt-two-antennas", reads)

    # ---- 4. dense-300-tags
    tags4, reads, labels = dense()
    write_scenario("dense-300-tags", reads, labels, {"b": [
        "Scenario dense-300-tags: a cart carrying 300 tagged items (distinct 96-bit EPCs) stands in"
        " portal B's field for 2 s, then moves away at 0.5 m/s; all 300 tags stay in the field for the"
        " 4 s of the capture. Reader B reads 2000 notices at 500 reads/s (one every 2 ms + jitter) in"
        " Gen2 inventory rounds: each round visits the tags in random order and reads each with"
        " probability 0.75..0.98 (weaker tags lower), never missing a tag 2 rounds in a row. RSSI ="
        " per-tag base uniform -68..-50 dBm, minus 12 dB per metre the cart has moved, + N(0, 2 dB),"
        " clamped to -80..-50, rounded to 1 dB.",
        "", PROV % (SEED + 4), "", HDR_B % (230400, " (assumed: 500 notices/s of 24 bytes exceed 115200 baud)")]})
    results["dense-300-tags"] = check_scenario("dense-300-tags", reads)
    assert results["dense-300-tags"]["b"]["tags"] == 300 and results["dense-300-tags"]["b"]["reads"] == 2000

    # ---- 5. demo: the first seconds of a belt like two-portals, 10 bags (for `scangate demo`)
    bags5, reads, labels = two_portals(10, SEED + 5)
    p5 = PROV % (SEED + 5)
    common5 = common.replace("200 bags", "10 bags")
    write_scenario("demo", reads, labels, {
        "a": [common5, "", p5, "", HDR_A],
        "b": [common5, "", p5, "", HDR_B % (115200, "")]})
    overlap5 = {tag: (t_at(X_B - FIELD_M, te), t_at(X_A + FIELD_M, te)) for tag, te in bags5}
    results["demo"] = check_scenario("demo", reads, overlap5)
    assert len(read_labels(os.path.join(OUT, "demo", "labels.tsv"))) == 20

    # ---- report
    for name, st in results.items():
        for reader, s in st.items():
            print("%-22s %s.cap  reads %6d  records %6d  tags %3d  in own pass %6d  in overlap band %5d"
                  " (outside own pass %d)  max gap %d ms" % (name, reader, s["reads"], s["records"], s["tags"],
                                                            s["in_own_pass"], s["in_overlap_band"],
                                                            s["in_band_outside_own_pass"], s["max_gap_ms"]))
    print("files:")
    for root, _, files in sorted(os.walk(OUT)):
        for fn in sorted(files):
            fp = os.path.join(root, fn)
            print("  %-45s %9d bytes" % (os.path.relpath(fp, OUT), os.path.getsize(fp)))
    print("self-check passed")


if __name__ == "__main__":
    main()
