#!/usr/bin/env python3
"""Generate hardware-fixture captures for four RFID reader serial protocols.

    python3 gen_fixtures.py            # writes ../em4100/ ../thingmagic/ ../uhf-bb/ ../chafon/

Python 3 standard library only. Written from hardware-fixtures/README.md (decoder output spec) and
REFERENCE-READERS.md sections 2-5 (public layouts, checksums, example frames); it does not
use the Rust decoder.

How the expected files are made:
  * Every capture is built from "items": a byte string plus what the decoder must output for
    it (read/frame lines), or a skip reason. The expected lines come from this construction.
    Skip items follow the skip-run rule of hardware-fixtures/README.md here: consecutive skip items form one run
    whose reason is that of the first one; the run's line is written just before the next
    read/frame line (or at the end of the capture).
  * Separately, a small reference decoder (bottom half of this file) written from hardware-fixtures/README.md
    scans the concatenated bytes of the written .cap file, and the script asserts that its
    output equals the constructed .expected lines. It also checks that no complete valid frame
    starts at any offset of the final truncated tail.
  * Every checksum/CRC routine is asserted against the test vectors and example frames quoted
    in REFERENCE-READERS.md before anything is written.
"""

import bisect
import os
import random
import sys

# The fixture folders are beside this tools/ folder.
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 20241130  # fixed seed: output is byte-for-byte reproducible


def h(s):
    """'FF 00 03' -> bytes"""
    return bytes.fromhex(s.replace(" ", "").replace("\n", ""))


# ============================================================================================
# Checksums (own implementations)
# ============================================================================================

def em_xor(data5):
    x = 0
    for b in data5:
        x ^= b
    return x


TM_TABLE = [0x0000, 0x1021, 0x2042, 0x3063, 0x4084, 0x50A5, 0x60C6, 0x70E7,
            0x8108, 0x9129, 0xA14A, 0xB16B, 0xC18C, 0xD1AD, 0xE1CE, 0xF1EF]


def tm_crc(data):
    """ThingMagic tm_crc: init 0xFFFF, fed nibble by nibble through a 16-entry table."""
    crc = 0xFFFF
    for b in data:
        crc = (((crc << 4) | (b >> 4)) ^ TM_TABLE[crc >> 12]) & 0xFFFF
        crc = (((crc << 4) | (b & 0x0F)) ^ TM_TABLE[crc >> 12]) & 0xFFFF
    return crc


def crc16_msb(data, init, poly=0x1021):
    """Plain non-reflected CRC-16, xorout 0."""
    crc = init
    for b in data:
        crc ^= b << 8
        for _ in range(8):
            crc = ((crc << 1) ^ poly) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
    return crc


def tm_crc_equiv(data):
    """The equivalent formulation given in REFERENCE-READERS.md: CRC-16 poly 0x1021, init
    0x1D0F, over all bytes except the last two, then XOR with those two read big-endian."""
    assert len(data) >= 2
    return crc16_msb(data[:-2], 0x1D0F) ^ ((data[-2] << 8) | data[-1])


def ccitt_false(data):
    return crc16_msb(data, 0xFFFF)


def gen2_crc(data):
    """EPC Gen2 StoredCRC = CRC-16/GENIBUS (poly 1021, init FFFF, xorout FFFF) over PC+EPC.
    Used only to make realistic tag-CRC bytes; decoders do not check it."""
    return crc16_msb(data, 0xFFFF) ^ 0xFFFF


def bb_sum(data):
    return sum(data) & 0xFF


def mcrf4xx(data):
    """CRC-16/MCRF4XX: reflected poly 0x8408, init 0xFFFF, xorout 0."""
    crc = 0xFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ 0x8408 if crc & 1 else crc >> 1
    return crc


VERIFIED = []  # human-readable list of passed vectors, printed at the end


def check(cond, what):
    assert cond, "CHECKSUM VECTOR FAILED: " + what
    VERIFIED.append(what)


def verify_checksums():
    # ---- catalogue check values ("123456789")
    check(mcrf4xx(b"123456789") == 0x6F91, "CRC-16/MCRF4XX check value 123456789 -> 6F91")
    check(ccitt_false(b"123456789") == 0x29B1, "CRC-16/CCITT-FALSE check value 123456789 -> 29B1")
    check(gen2_crc(b"123456789") == 0xD64E, "CRC-16/GENIBUS check value 123456789 -> D64E")

    # ---- em4100 (section 2)
    card = h("62E3086CED")
    check(em_xor(card) == 0x08, "em4100 62^E3^08^6C^ED = 08")
    rdm = h("02 36 32 45 33 30 38 36 43 45 44 30 38 03")
    id12 = h("02 36 32 45 33 30 38 36 43 45 44 30 38 0D 0A 03")
    check(rdm[1:11].decode() == "62E3086CED" and int(rdm[11:13].decode(), 16) == em_xor(card),
          "em4100 RDM6300 example 02 36 32 45 33 30 38 36 43 45 44 30 38 03")
    check(id12[:13] == rdm[:13] and id12[13:] == h("0D 0A 03"),
          "em4100 ID-12LA example 02 ... 30 38 0D 0A 03")

    # ---- thingmagic (section 3)
    check(tm_crc(h("00 03")) == 0x1D0C, "tm_crc(00 03) = 1D0C")
    check(ccitt_false(h("00 03")) == 0x2D6C, "CRC-16/CCITT-FALSE(00 03) = 2D6C (so tm_crc is not CCITT-FALSE)")
    tm_vectors = [
        ("FF 00 03 1D 0C", "version command"),
        ("FF 0A 24 03 E8 00 00 00 00 00 03 00 EE 58 9D", "SparkFun write example"),
        ("FF 03 9A 01 0C 00 A3 5D", "read filter off"),
        ("FF 10 2F 00 00 01 22 00 00 05 07 22 10 00 1B 03 E8 01 FF DD 2B", "start continuous reading"),
        ("FF 04 2F 00 00 01 22 00 00 6D C3", "continuous-read start acknowledgement"),
        ("FF 03 2F 00 00 02 5E 86", "stop continuous reading"),
        ("FF 01 97 0D 4B B0", "set region NA2"),
        ("FF 28 22 00 00 10 00 1B 01 FF 01 01 C4 11 0E 16 40 00 00 01 27 00 00 05"
         " 00 00 0F 00 80 30 00 00 00 00 00 00 00 00 00 00 00 15 45 E9 4A 56 1D",
         "SparkFun parseResponse() tag record example"),
    ]
    for hexs, name in tm_vectors:
        f = h(hexs)
        body, crc = f[1:-2], (f[-2] << 8) | f[-1]
        check(tm_crc(body) == crc, "tm_crc %s: %s -> %04X" % (name, hexs, crc))
        check(tm_crc_equiv(body) == crc, "tm_crc equivalent form (init 1D0F, xor last two) %s" % name)
    # both forms agree on random data
    r = random.Random(1)
    for _ in range(2000):
        d = bytes(r.randrange(256) for _ in range(r.randrange(2, 40)))
        assert tm_crc(d) == tm_crc_equiv(d)
    VERIFIED.append("tm_crc nibble-table form == init-1D0F equivalent form on 2000 random inputs")

    # ---- uhf-bb (section 4)
    bb_vectors = [
        ("BB 00 22 00 00 22 7E", "single inventory"),
        ("BB 00 27 00 03 22 27 10 83 7E", "multi-polling 10000"),
        ("BB 00 27 00 03 22 FF FF 4A 7E", "multi-polling 65535"),
        ("BB 00 28 00 00 28 7E", "stop multi-polling"),
        ("BB 01 28 00 01 00 2A 7E", "stop answer"),
        ("BB 00 03 00 01 00 04 7E", "module info"),
        ("BB 01 FF 00 01 15 16 7E", "error answer no tag"),
        ("BB 02 22 00 11 C9 34 00 30 75 1F EB 70 5C 59 04 E3 D5 0D 70 3A 76 EF 7E", "M100 tag notice example"),
    ]
    for hexs, name in bb_vectors:
        f = h(hexs)
        pl = (f[3] << 8) | f[4]
        check(len(f) == pl + 7 and f[0] == 0xBB and f[-1] == 0x7E and bb_sum(f[1:-2]) == f[-2],
              "uhf-bb sum %s: %s" % (name, hexs))
    check(h("C9")[0] - 256 == -55, "uhf-bb RSSI C9 = -55 dBm")

    # ---- chafon (section 5)
    cf_vectors = [
        ("04 FF 01 1B B4", "inventory command broadcast"),
        ("04 00 01 DB 4B", "inventory command adr 00"),
        ("0D FF 01 0F 00 01 00 00 00 00 80 14 C0 3A", "288 inventory command"),
        ("05 00 76 01 EB D8", "set real-time mode"),
        ("05 00 76 00 62 C9", "set answer mode"),
        ("15 00 01 03 01 01 0C 00 00 00 00 00 00 00 00 00 00 03 13 6B B1 A5", "288-family inventory example"),
        ("13 00 01 03 01 0C 00 00 00 00 00 00 00 00 00 00 03 13 3F 39", "UHFReader18 inventory example"),
    ]
    for hexs, name in cf_vectors:
        f = h(hexs)
        crc = mcrf4xx(f[:-2])
        check(f[0] == len(f) - 1 and crc == (f[-2] | (f[-1] << 8)),
              "chafon CRC-16/MCRF4XX LSB-first %s: %s" % (name, hexs))
        check(mcrf4xx(f) == 0, "chafon residue property (CRC over frame incl. CRC = 0) %s" % name)

    # ---- Gen2 tag CRC of the example tags (informative: lets us generate realistic tag CRCs)
    check(gen2_crc(h("3400 30751FEB705C5904E3D50D70")) == 0x3A76,
          "Gen2 CRC-16/GENIBUS over PC+EPC of the M100 example = tag CRC 3A76")
    check(gen2_crc(h("3000 000000000000000000001545")) == 0xE94A,
          "Gen2 CRC-16/GENIBUS over PC+EPC of the SparkFun example = tag CRC E94A")


# ============================================================================================
# Capture builder (construction side: expected lines come from here)
# ============================================================================================

def read_line(kind, tag, rssi=None, ant=None):
    """hardware-fixtures/README.md read line. rssi: int dBm, or a string such as 'raw:107'; None -> '-'.
    A read with an empty EPC has no identity: the decoder reports it as `frame empty_epc`."""
    if kind == "epc" and tag == "":
        return "frame\tempty_epc"
    if rssi is None and ant is None:
        return "%s\t%s\t-" % (kind, tag)
    if rssi is None:
        rs = "-"
    elif isinstance(rssi, str):
        rs = rssi
    else:
        rs = "%.1f" % rssi
    return "%s\t%s\t-\t%s\t%s" % (kind, tag, rs, "-" if ant is None else str(ant))


class Item:
    def __init__(self, data, lines=None, skip=None, note=None):
        self.data = bytes(data)
        self.lines = list(lines or [])
        self.skip = skip
        assert (skip is None) == bool(self.lines), "an item is either output lines or a skip" 


def F(data, *lines):
    """a frame/read item"""
    assert lines
    return Item(data, lines=lines)


def S(data, reason):
    """a skipped item (starts or continues a skip run)"""
    return Item(data, skip=reason)


class Capture:
    def __init__(self, folder, name, header):
        self.folder, self.name, self.header = folder, name, header
        self.records = []        # (offset_ms, bytes)
        self.expected = []
        self.pending = None      # reason of the open skip run
        self.stream = bytearray()
        self.truncated_at = None
        self.t = 0

    # -- expected side
    def _account(self, item):
        if item.skip:
            if item.skip == "truncated":
                assert self.pending is None, "truncated tail must follow a read/frame directly"
                self.truncated_at = len(self.stream)
            if self.pending is None:
                self.pending = item.skip
        else:
            if self.pending is not None:
                self.expected.append("skip\t" + self.pending)
                self.pending = None
            self.expected.extend(item.lines)
        self.stream += item.data

    # -- record side
    def rec(self, t, *items):
        """all items in ONE record at offset t"""
        assert t >= self.t
        self.t = t
        data = b"".join(i.data for i in items)
        for i in items:
            self._account(i)
        self.records.append((t, data))

    def split(self, t, items, rng, lo=1, hi=3, step=1):
        """items cut into records of lo..hi bytes, offsets t, t+step, ..."""
        assert t >= self.t
        data = b"".join(i.data for i in items)
        for i in items:
            self._account(i)
        p = 0
        while p < len(data):
            n = rng.randint(lo, hi)
            self.records.append((t, data[p:p + n]))
            self.t = t
            p += n
            t += step
        return t

    def raw_records(self, items, records):
        """items whose bytes were cut into records by someone else (burst tty model)"""
        for i in items:
            self._account(i)
        assert b"".join(r for _, r in records) == bytes(self.stream[len(self.stream) - sum(len(i.data) for i in items):])
        for t, r in records:
            assert t >= self.t
            self.t = t
            self.records.append((t, r))

    def finish(self):
        if self.pending is not None:
            self.expected.append("skip\t" + self.pending)
            self.pending = None
        assert b"".join(r for _, r in self.records) == bytes(self.stream)

    def counts(self):
        c = {"reads": 0, "frames": 0, "skips": 0}
        for l in self.expected:
            k = l.split("\t")[0]
            c["skips" if k == "skip" else "frames" if k == "frame" else "reads"] += 1
        return c

    def write(self):
        d = os.path.join(HERE, self.folder)
        os.makedirs(d, exist_ok=True)
        cap = ["scangate-capture v1 serial"]
        cap += ["# " + l if l else "#" for l in self.header]
        for t, r in self.records:
            cap.append("%d hex %s" % (t, r.hex(" ")))
        with open(os.path.join(d, self.name + ".cap"), "w") as f:
            f.write("\n".join(cap) + "\n")
        exp = ["# kind<TAB>tag<TAB>symbology<TAB>rssi<TAB>antenna (3 columns when rssi and antenna are both '-');"
               " skip<TAB>reason; frame<TAB>what"]
        exp += self.expected
        with open(os.path.join(d, self.name + ".expected"), "w") as f:
            f.write("\n".join(exp) + "\n")


# ============================================================================================
# Frame constructors
# ============================================================================================

def hx(b):
    return bytes(b).hex().upper()


def pc_for(epc_len, extra=0):
    """Gen2 PC word: EPC length in words in bits 15..11, plus extra bits"""
    assert epc_len % 2 == 0
    return ((epc_len // 2) << 11) | extra


# ---------------- em4100 ----------------

def em_frame(card5, form="rdm", lower=False, chk=None, chars=None, trailer=None):
    s = card5.hex().upper() + ("%02X" % em_xor(card5) if chk is None else chk)
    if chars is not None:
        s = chars
    if lower:
        s = s.lower()
    tr = trailer if trailer is not None else (b"\x03" if form == "rdm" else b"\r\n\x03")
    return b"\x02" + s.encode("ascii") + tr


def em_read(card5, **kw):
    return F(em_frame(card5, **kw), read_line("em4100", card5.hex().upper()))


# ---------------- uhf-bb ----------------

def bb_frame(typ, cmd, param, bad_sum=False):
    body = bytes([typ, cmd]) + len(param).to_bytes(2, "big") + bytes(param)
    s = bb_sum(body)
    if bad_sum:
        s ^= 0x24
    return b"\xBB" + body + bytes([s, 0x7E])


def bb_notice_bytes(rssi, epc, pc=None, bad_sum=False):
    pc = pc_for(len(epc)) if pc is None else pc
    pcb = pc.to_bytes(2, "big")
    crc = gen2_crc(pcb + epc).to_bytes(2, "big")
    return bb_frame(0x02, 0x22, bytes([rssi & 0xFF]) + pcb + epc + crc, bad_sum=bad_sum)


def bb_read(rssi, epc, **kw):
    return F(bb_notice_bytes(rssi, epc, **kw), read_line("epc", hx(epc), rssi, None))


# ---------------- thingmagic ----------------

def tm_frame(op, status, data, bad_crc=False):
    data = bytes(data)
    assert len(data) <= 255
    body = bytes([len(data), op]) + status.to_bytes(2, "big") + data
    crc = tm_crc(body)
    if bad_crc:
        crc ^= 0x0100
    return b"\xFF" + body + crc.to_bytes(2, "big")


def tm_record(flags, epc, rssi=-60, ant=0x11, count=1, freq=915250, ts=0, phase=0, proto=5,
              emb=b"", emb_bits=None, gpio=0x00, pc=None, xpc=(), epc_bits=None):
    r = bytearray()
    if flags & 0x0001: r += bytes([count])
    if flags & 0x0002: r += bytes([rssi & 0xFF])
    if flags & 0x0004: r += bytes([ant])
    if flags & 0x0008: r += freq.to_bytes(3, "big")
    if flags & 0x0010: r += ts.to_bytes(4, "big")
    if flags & 0x0020: r += phase.to_bytes(2, "big")
    if flags & 0x0040: r += bytes([proto])
    if flags & 0x0080:
        bits = len(emb) * 8 if emb_bits is None else emb_bits
        r += bits.to_bytes(2, "big") + emb
    if flags & 0x0100: r += bytes([gpio])
    if pc is None:
        pc = pc_for(len(epc), 0x0200 if xpc else 0)
    pcb = pc.to_bytes(2, "big")
    xb = b"".join(w.to_bytes(2, "big") for w in xpc)
    crc = gen2_crc(pcb + epc).to_bytes(2, "big")
    # EPC bit count covers PC + XPC words + EPC + tag CRC (as MercuryAPI parses it)
    nbits = (2 + len(xb) + len(epc) + 2) * 8 if epc_bits is None else epc_bits
    r += nbits.to_bytes(2, "big") + pcb + xb + epc + crc
    return bytes(r)


def tm_stream_bytes(flags, record, bad_crc=False):
    data = bytes([0x10, 0x00, 0x1B]) + flags.to_bytes(2, "big") + b"\x01" + record
    return tm_frame(0x22, 0x0000, data, bad_crc=bad_crc)


def tm_read(flags, epc, rssi=-60, ant=0x11, bad_crc=False, **kw):
    rec = tm_record(flags, epc, rssi=rssi, ant=ant, **kw)
    line = read_line("epc", hx(epc),
                     rssi if flags & 0x0002 else None,
                     ((ant >> 4) or (ant & 0x0F)) if flags & 0x0004 else None)
    return F(tm_stream_bytes(flags, rec, bad_crc), line)


def tm_buffered(flags, recs, readopt=0x00):
    """recs: list of (epc, rssi, ant). One 0x29 reply with len(recs) records."""
    data = bytearray(flags.to_bytes(2, "big") + bytes([readopt, len(recs)]))
    lines = []
    for epc, rssi, ant in recs:
        data += tm_record(flags, epc, rssi=rssi, ant=ant)
        lines.append(read_line("epc", hx(epc),
                               rssi if flags & 0x0002 else None,
                               ((ant >> 4) or (ant & 0x0F)) if flags & 0x0004 else None))
    return F(tm_frame(0x29, 0x0000, data), *lines)


# ---------------- chafon ----------------

def cf_frame(recmd, status, data, adr=0x00, bad_crc=False):
    body = bytes([len(data) + 5, adr, recmd, status]) + bytes(data)
    assert body[0] <= 255
    crc = mcrf4xx(body)
    if bad_crc:
        crc ^= 0x0008
    return body + bytes([crc & 0xFF, crc >> 8])


CF_ANT = {0x01: 1, 0x02: 2, 0x04: 3, 0x08: 4}


def cf_inv288(status, ant, tags, bad_crc=False):
    """tags: list of (epc, rssi_raw)"""
    data = bytearray([ant, len(tags)])
    for epc, rssi in tags:
        data += bytes([len(epc)]) + epc + bytes([rssi])
    lines = [read_line("epc", hx(epc), "raw:%d" % rssi, CF_ANT.get(ant)) for epc, rssi in tags]
    return F(cf_frame(0x01, status, data, bad_crc=bad_crc), *lines)


def cf_rt(ant, epc, rssi):
    data = bytes([ant, len(epc)]) + epc + bytes([rssi])
    return F(cf_frame(0xEE, 0x00, data), read_line("epc", hx(epc), "raw:%d" % rssi, CF_ANT.get(ant)))


# ============================================================================================
# Reference decoder (check side), written from hardware-fixtures/README.md only. It never sees the items above,
# only the bytes read back from the written .cap file.
# try_*(buf, i) returns one of:
#   ("need",)                     more bytes needed to judge the candidate at i
#   ("skip", cause)               the byte at i is skipped (resync advances ONE byte)
#   ("bad_record", length)        valid checksum, inconsistent tag data: whole frame skipped
#   ("ok", length, [lines])       a read/frame
# ============================================================================================

HEXCH = set(b"0123456789abcdefABCDEF")


def try_em4100(b, i):
    n = len(b)
    if b[i] != 0x02:
        return ("skip", "garbage")
    if n - i < 14:
        return ("need",)
    t = b[i + 13]
    if t == 0x03:
        length = 14
    elif t == 0x0D:
        if n - i < 15:
            return ("need",)
        if b[i + 14] != 0x0A:
            return ("skip", "bad_frame")
        if n - i < 16:
            return ("need",)
        if b[i + 15] != 0x03:
            return ("skip", "bad_frame")
        length = 16
    else:
        return ("skip", "bad_frame")
    chars = b[i + 1:i + 13]
    if not all(c in HEXCH for c in chars):
        return ("skip", "not_hex")
    v = bytes.fromhex(chars.decode())
    x = 0
    for c in v[:5]:
        x ^= c
    if x != v[5]:
        return ("skip", "bad_checksum")
    return ("ok", length, ["em4100\t%s\t-" % chars[:10].decode().upper()])


def fmt_read(tag, rssi, ant):
    if tag == "":
        return "frame\tempty_epc"
    if rssi is None and ant is None:
        return "epc\t%s\t-" % tag
    return "epc\t%s\t-\t%s\t%s" % (tag, "-" if rssi is None else rssi, "-" if ant is None else ant)


def try_uhfbb(b, i):
    n = len(b)
    if b[i] != 0xBB:
        return ("skip", "garbage")
    if n - i < 2:
        return ("need",)
    if b[i + 1] > 2:
        return ("skip", "garbage")
    if n - i < 5:
        return ("need",)
    pl = (b[i + 3] << 8) | b[i + 4]
    if pl > 1024:
        return ("skip", "garbage")
    length = pl + 7
    if n - i < length:
        return ("need",)
    if b[i + length - 1] != 0x7E:
        return ("skip", "garbage")
    if sum(b[i + 1:i + length - 2]) & 0xFF != b[i + length - 2]:
        return ("skip", "bad_checksum")
    typ, cmd, p = b[i + 1], b[i + 2], b[i + 5:i + 5 + pl]
    if typ == 2 and cmd == 0x22:
        if pl < 5:
            return ("bad_record", length)
        rssi = p[0] - 256 if p[0] >= 128 else p[0]
        return ("ok", length, [fmt_read(p[3:pl - 2].hex().upper(), "%d.0" % rssi, None)])
    if typ == 1 and cmd == 0xFF:
        return ("ok", length, ["frame\tno_tag" if pl >= 1 and p[0] == 0x15 else "frame\terror"])
    if typ == 1:
        return ("ok", length, ["frame\treply"])
    if typ == 0:
        return ("ok", length, ["frame\tcommand"])
    return ("ok", length, ["frame\tnotice"])


def tm_parse_record(r, p, flags):
    """returns (new_p, epc_hex, rssi, ant) or None if inconsistent"""
    def need(k):
        return p + k <= len(r)
    rssi = ant = None
    for bit, size in ((0x0001, 1), (0x0002, 1), (0x0004, 1), (0x0008, 3), (0x0010, 4),
                      (0x0020, 2), (0x0040, 1)):
        if flags & bit:
            if not need(size):
                return None
            if bit == 0x0002:
                rssi = r[p] - 256 if r[p] >= 128 else r[p]
            if bit == 0x0004:
                ant = (r[p] >> 4) or (r[p] & 0x0F)
            p += size
    if flags & 0x0080:
        if not need(2):
            return None
        bits = (r[p] << 8) | r[p + 1]
        p += 2 + (bits + 7) // 8
    if flags & 0x0100:
        p += 1
    if not need(2):
        return None
    bits = (r[p] << 8) | r[p + 1]
    p += 2
    if bits % 8:
        return None
    nb = bits // 8
    if nb < 4 or not need(nb):
        return None
    pc = (r[p] << 8) | r[p + 1]
    hdr = 2
    if pc & 0x0200:
        if nb < 6:
            return None
        x1 = (r[p + 2] << 8) | r[p + 3]
        hdr += 2
        if x1 & 0x8000:
            hdr += 2
    epc_len = nb - hdr - 2
    if epc_len < 0:
        return None
    epc = r[p + hdr:p + hdr + epc_len]
    return (p + nb, bytes(epc).hex().upper(), rssi, ant)


def try_thingmagic(b, i):
    n = len(b)
    if b[i] != 0xFF:
        return ("skip", "garbage")
    if n - i < 2:
        return ("need",)
    ln = b[i + 1]
    length = ln + 7
    if n - i < length:
        return ("need",)
    if tm_crc(b[i + 1:i + length - 2]) != ((b[i + length - 2] << 8) | b[i + length - 1]):
        return ("skip", "bad_checksum")
    op, st, d = b[i + 2], (b[i + 3] << 8) | b[i + 4], b[i + 5:i + 5 + ln]
    if op == 0x22 and st == 0x0400:
        return ("ok", length, ["frame\tkeepalive"])
    if st != 0:
        return ("ok", length, ["frame\terror"])
    if op == 0x22:
        if ln > 8 and d[0] & 0x10 and d[5] == 0x01:
            flags = (d[3] << 8) | d[4]
            res = tm_parse_record(d, 6, flags)
            if res is None or res[0] != ln:
                return ("bad_record", length)
            _, epc, rssi, ant = res
            return ("ok", length, [fmt_read(epc, None if rssi is None else "%d.0" % rssi, ant)])
        return ("ok", length, ["frame\tstatus"])
    if op == 0x29:
        if ln < 4:
            return ("bad_record", length)
        flags = (d[0] << 8) | d[1]
        cnt = d[3]
        p = 4
        out = []
        for _ in range(cnt):
            res = tm_parse_record(d, p, flags)
            if res is None:
                return ("bad_record", length)
            p, epc, rssi, ant = res
            out.append(fmt_read(epc, None if rssi is None else "%d.0" % rssi, ant))
        if p != ln or not out:
            return ("bad_record", length)
        return ("ok", length, out)
    return ("ok", length, ["frame\treply"])


def make_try_chafon(classic):
    def try_chafon(b, i):
        n = len(b)
        if b[i] < 5:
            return ("skip", "garbage")
        length = b[i] + 1
        if n - i < length:
            return ("need",)
        if mcrf4xx(b[i:i + length - 2]) != (b[i + length - 2] | (b[i + length - 1] << 8)):
            return ("skip", "bad_checksum")
        recmd, st, d = b[i + 2], b[i + 3], b[i + 4:i + length - 2]
        antmap = {0x01: "1", 0x02: "2", 0x04: "3", 0x08: "4"}
        if recmd == 0x01:
            if st in (1, 2, 3, 4):
                if not d:
                    return ("ok", length, ["frame\tno_tag"])
                out = []
                if classic:
                    num, p = d[0], 1
                    if num == 0:
                        return ("ok", length, ["frame\tno_tag"])
                    for _ in range(num):
                        if p >= len(d) or p + 1 + d[p] > len(d):
                            return ("bad_record", length)
                        out.append(fmt_read(bytes(d[p + 1:p + 1 + d[p]]).hex().upper(), None, None))
                        p += 1 + d[p]
                else:
                    if len(d) < 2:
                        return ("bad_record", length)
                    ant, num, p = antmap.get(d[0]), d[1], 2
                    if num == 0:
                        return ("ok", length, ["frame\tno_tag"])
                    for _ in range(num):
                        if p >= len(d):
                            return ("bad_record", length)
                        l = d[p] & 0x7F
                        if p + 1 + l + 1 > len(d):
                            return ("bad_record", length)
                        out.append(fmt_read(bytes(d[p + 1:p + 1 + l]).hex().upper(), "raw:%d" % d[p + 1 + l], ant))
                        p += l + 2
                if p != len(d):
                    return ("bad_record", length)
                return ("ok", length, out)
            if st == 0xF8:
                return ("ok", length, ["frame\terror"])
            return ("ok", length, ["frame\tstatus"])
        if recmd == 0xEE and not classic:
            if st == 0x00:
                if len(d) < 3 or 2 + d[1] + 1 != len(d):
                    return ("bad_record", length)
                l = d[1]
                return ("ok", length, [fmt_read(bytes(d[2:2 + l]).hex().upper(), "raw:%d" % d[2 + l],
                                                antmap.get(d[0]))])
            if st == 0x28:
                return ("ok", length, ["frame\theartbeat"])
            return ("ok", length, ["frame\tstatus"])
        return ("ok", length, ["frame\treply"])
    return try_chafon


def ref_decode(buf, tryf):
    """returns (lines, eof_pos or None)"""
    buf = bytes(buf)
    out, run, i, eof = [], None, 0, None
    while i < len(buf):
        r = tryf(buf, i)
        if r[0] == "need":
            eof = i
            if run is None:
                run = "truncated"
            break
        if r[0] == "skip":
            run = run or r[1]
            i += 1
        elif r[0] == "bad_record":
            run = run or "bad_record"
            i += r[1]
        else:
            if run:
                out.append("skip\t" + run)
                run = None
            out.extend(r[2])
            i += r[1]
    if run:
        out.append("skip\t" + run)
    return out, eof


def read_cap(path):
    """parse a written .cap file back (header, comments, '<ms> hex <bytes>')"""
    stream, last, header = bytearray(), -1, None
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line or line.startswith("#"):
                continue
            if header is None:
                header = line
                assert header == "scangate-capture v1 serial", header
                continue
            t, kind, rest = line.split(" ", 2)
            assert kind == "hex" and int(t) >= last
            last = int(t)
            stream += bytes.fromhex(rest)
    return bytes(stream)


def read_expected(path):
    with open(path) as f:
        return [l.rstrip("\n") for l in f if l.strip() and not l.startswith("#")]


# ============================================================================================
# Fixture definitions
# ============================================================================================

EPC4 = h("1234ABCD")
EPC8 = h("E200001A2B3C4D5E")
EPC12 = h("30340242201D8C4000000123")
EPC12B = h("3034F87A3C0012C000001D2F")
EPC16 = h("E2801160600002093A5C1F0B0000ABCD")
EPC0 = b""

SRC_EM = ("REFERENCE-READERS.md section 2 (em4100): frame 02 + 10 hex chars + 2 hex chars (XOR of the"
          " 5 bytes) + 03 (RDM6300/RDM630: Seeed RDM630 datasheet/wiki) or 0D 0A 03 (ID-12LA: ID Innovations"
          " datasheet format line, quoted on forum.arduino.cc \"RFID format\"); clone frames with a"
          " wrong or ';D' checksum (public forum posts cited there: forum.seeedstudio.com \"RDM630 -"
          " Checksum Problems\", forum.hobbycomponents.com RDM6300 thread).")
SRC_TM = ("REFERENCE-READERS.md section 3 (thingmagic): module->host frame FF LEN OP STATUS(2) DATA CRC(2,"
          " big-endian), tm_crc from MercuryAPI serial_reader_l3.c (copy at GitHub tosog/mercury) and the"
          " SparkFun Simultaneous RFID library; metadata flag order and streamed/buffered layouts from"
          " the same MercuryAPI parser (parseMetadataFromMessage/parseMetadataOnly).")
SRC_BB = ("REFERENCE-READERS.md section 4 (uhf-bb): BB Type Cmd PL(2) Param Sum 7E, sum = low 8 bits of"
          " Type..last Param; tag notice 02/22 = RSSI(i8 dBm) PC EPC tag-CRC (MagicRF M100/QM100"
          " manual as restated in public drivers; electron.id EL-UHF-RMT01 pages).")
SRC_CF = ("REFERENCE-READERS.md section 5 (chafon): Len Adr reCmd Status Data CRC-16/MCRF4XX (LSB first);"
          " RSSI (288) family inventory data Ant Num (len EPC RSSI)* with the Ant bitmask, real-time EE"
          " frames and heartbeat; classic (UHFReader18) data Num (EPClen EPC)*. Sources compiled there:"
          " Chafon UHFReader18 User's Manual V2.0, SID UR-series user manual v1.14, GitHub"
          " wabson/chafon-rfid, GitHub Timereversal/rfidtime.")


def wrap(text, width=94):
    out, line = [], ""
    for w in text.split():
        if len(line) + len(w) + 1 > width:
            out.append(line)
            line = w
        else:
            line = (line + " " + w).strip()
    if line:
        out.append(line)
    return out


def header(*paras):
    lines = []
    for p in paras:
        if isinstance(p, (list, tuple)):
            for q in p:
                ww = wrap(q, 92)
                lines.append("- " + ww[0])
                lines += ["  " + x for x in ww[1:]]
        else:
            lines += wrap(p)
    return lines


CONSTRUCTED = ("Constructed by hardware-fixtures gen_fixtures.py from the public frame layout; not a field"
               " recording. Expected output written from the construction (see the folder README).")


# ---------------- reference examples ----------------

def ref_em4100():
    c = Capture("em4100", "reference-examples", header(
        "The two em4100 example frames quoted in REFERENCE-READERS.md section 2, byte-exact. " + CONSTRUCTED,
        ["0 ms: RDM6300/RDM630 form (14 bytes, ETX only): card 62E3086CED, checksum"
         " 62^E3^08^6C^ED = 08 (source: Seeed RDM630 datasheet/wiki).",
         "120 ms: the same card in ID-12LA form (16 bytes, CR LF before ETX), constructed from the"
         " ID Innovations ID-12LA datasheet format line (quoted on forum.arduino.cc \"RFID format\")."]))
    card = h("62E3086CED")
    c.rec(0, F(h("02 36 32 45 33 30 38 36 43 45 44 30 38 03"), read_line("em4100", "62E3086CED")))
    c.rec(120, F(h("02 36 32 45 33 30 38 36 43 45 44 30 38 0D 0A 03"), read_line("em4100", "62E3086CED")))
    assert c.stream == em_frame(card) + em_frame(card, form="id12")
    return c


def ref_thingmagic():
    c = Capture("thingmagic", "reference-examples", header(
        "ThingMagic/JADAK Mercury module->host frames quoted in REFERENCE-READERS.md section 3, in the"
        " order a SparkFun startReading() session produces them. " + CONSTRUCTED,
        ["0 ms: continuous-read start acknowledgement FF 04 2F 00 00 01 22 00 00 6D C3 (opcode 2F,"
         " status 0000 -> frame reply; CRC 6DC3 recomputed) (source: SparkFun library / URA transport"
         " logs as quoted there).",
         "300 ms: the streamed tag record from the SparkFun library parseResponse() comment"
         " (sparkfun/SparkFun_Simultaneous_RFID_Tag_Reader_Library src/SparkFun_UHF_RFID_Reader.cpp"
         " @ d52c969): flags 01FF, RSSI C4 = -60 dBm, antenna 11 = port 1, EPC"
         " 000000000000000000001545, frame CRC 561D.",
         "1300 ms: the continuous-mode keep-alive FF 00 22 04 00 (status 0400, no tags) with its CRC"
         " computed by tm_crc (MercuryAPI serial_reader_l3.c)."]))
    c.rec(0, F(h("FF 04 2F 00 00 01 22 00 00 6D C3"), "frame\treply"))
    ex = h("FF 28 22 00 00 10 00 1B 01 FF 01 01 C4 11 0E 16 40 00 00 01 27 00 00 05"
           " 00 00 0F 00 80 30 00 00 00 00 00 00 00 00 00 00 00 15 45 E9 4A 56 1D")
    # our own constructor must reproduce the example byte-exactly
    assert tm_stream_bytes(0x01FF, tm_record(0x01FF, h("000000000000000000001545"), rssi=-60, ant=0x11,
                                             freq=0x0E1640, ts=295, gpio=0x0F)) == ex
    c.rec(300, F(ex, read_line("epc", "000000000000000000001545", -60, 1)))
    ka = tm_frame(0x22, 0x0400, b"")
    c.rec(1300, F(ka, "frame\tkeepalive"))
    return c, ka


def ref_uhfbb():
    c = Capture("uhf-bb", "reference-examples", header(
        "MagicRF M100/QM100-family (BB ... 7E) frames quoted in REFERENCE-READERS.md section 4,"
        " byte-exact. " + CONSTRUCTED,
        ["0 ms: the M100/QM100 manual tag notice example (reproduced in many public drivers):"
         " PL 17, RSSI C9 = -55 dBm, PC 3400, EPC 30751FEB705C5904E3D50D70, sum EF.",
         "100 ms: error answer BB 01 FF 00 01 15 16 7E (code 15 = inventory found no tag) -> frame no_tag.",
         "200 ms: stop multi-polling answer BB 01 28 00 01 00 2A 7E -> frame reply."]))
    ex = h("BB 02 22 00 11 C9 34 00 30 75 1F EB 70 5C 59 04 E3 D5 0D 70 3A 76 EF 7E")
    assert bb_notice_bytes(-55, h("30751FEB705C5904E3D50D70"), pc=0x3400) == ex
    c.rec(0, F(ex, read_line("epc", "30751FEB705C5904E3D50D70", -55, None)))
    c.rec(100, F(h("BB 01 FF 00 01 15 16 7E"), "frame\tno_tag"))
    c.rec(200, F(h("BB 01 28 00 01 00 2A 7E"), "frame\treply"))
    return c


def ref_chafon():
    c = Capture("chafon", "reference-examples", header(
        "Chafon UHFReader288/86 (RSSI protocol family) inventory answer quoted in REFERENCE-READERS.md"
        " section 5, byte-exact (source: GitHub wabson/chafon-rfid tests @ 05b55f3). " + CONSTRUCTED,
        ["0 ms: Len 0x15 = 21, Adr 00, reCmd 01, status 03, Ant 01 (antenna 1), Num 1, EPC"
         " 000000000000000000000313, RSSI raw 6B = 107, CRC A5B1 sent B1 A5."]))
    ex = h("15 00 01 03 01 01 0C 00 00 00 00 00 00 00 00 00 00 03 13 6B B1 A5")
    assert cf_inv288(0x03, 0x01, [(h("000000000000000000000313"), 0x6B)]).data == ex
    c.rec(0, F(ex, read_line("epc", "000000000000000000000313", "raw:107", 1)))
    k = Capture("chafon", "reference-examples-classic", header(
        "Chafon UHFReader18 / CF-RU5102 (classic family: no antenna, no RSSI) inventory answer quoted in"
        " REFERENCE-READERS.md section 5, byte-exact (source: GitHub wabson/chafon-rfid tests @ 05b55f3;"
        " layout from the Chafon UHFReader18 User's Manual V2.0). Decode with the classic family. "
        + CONSTRUCTED,
        ["0 ms: Len 0x13 = 19, Adr 00, reCmd 01, status 03, Num 1, EPClen 0C, EPC 000000000000000000000313,"
         " CRC 393F sent 3F 39."]))
    k.rec(0, F(h("13 00 01 03 01 0C 00 00 00 00 00 00 00 00 00 00 03 13 3F 39"),
               read_line("epc", "000000000000000000000313")))
    return c, k


# ---------------- nasty captures ----------------

NASTY_INTRO = ("Hostile-input capture: each case below is built from the public layout so that the decoder's"
               " resynchronisation and the skip-run rule of hardware-fixtures/README.md (one skip item per run of skipped"
               " bytes, reason = cause of the run's first byte, emitted before the next read/frame) are"
               " exercised. " + CONSTRUCTED)


def nasty_em4100():
    rng = random.Random(SEED + 1)
    A, B, C = h("62E3086CED"), h("010086F444"), h("1A2B3C4D5E")
    D, E, L = h("7F00A5C3E1"), h("04001D6A9B"), h("AB00CDEF12")
    b_chk, b_bad = "%02X" % em_xor(B), "%02X" % (em_xor(B) ^ 0x10)
    l_chars = em_frame(L, lower=True)[1:13].decode()
    assert any(ch in "abcdef" for ch in l_chars[10:]) and l_chars != l_chars.upper()
    c = Capture("em4100", "nasty", header(
        NASTY_INTRO + " Facts used: " + SRC_EM,
        ["0 ms: power-up garbage starting with 00 (not STX), including CR LF ETX and the start of an"
         " interrupted frame (02 30 31 30) -> skip garbage.",
         "40 ms: card 62E3086CED (RDM6300 form) split into records of 1-3 bytes.",
         "120 ms: card 010086F444 (printed 0008844356) in ID-12LA form, then in the same record the same"
         " card (RDM6300 form) whose checksum chars are wrong but valid hex (%s instead of %s) -> skip"
         " bad_checksum; 180 ms the card again, good." % (b_bad, b_chk),
         "300 ms: three frames back to back in one record (RDM6300, RDM6300, ID-12LA forms).",
         "420 ms: card AB00CDEF12 sent with lowercase hex (%s) -> read reported uppercase." % l_chars,
         "480 ms: RDM6300-clone frame with checksum ';D' (62E3086CED;D + 03) -> skip not_hex; 540 ms good.",
         "600 ms: 12 valid hex chars (correct checksum) followed by 0D 03 (LF missing) -> skip bad_frame;"
         " 660 ms good.",
         "720 ms: good frame, then 780 ms the first 6 bytes of a frame (capture ends) -> skip truncated."]))
    c.rec(0, S(h("00 00 F8 80 FF 3F 0D 0A 03 02 30 31 30"), "garbage"))
    c.split(40, [em_read(A)], rng)
    c.rec(120, em_read(B, form="id12"), S(em_frame(B, chk=b_bad), "bad_checksum"))
    c.rec(180, em_read(B))
    c.rec(300, em_read(C), em_read(C), em_read(D, form="id12"))
    c.rec(420, em_read(L, lower=True))
    c.rec(480, S(em_frame(A, chars="62E3086CED;D"), "not_hex"))
    c.rec(540, em_read(A))
    c.rec(600, S(em_frame(E, trailer=b"\r\x03"), "bad_frame"))
    c.rec(660, em_read(E, form="id12"))
    c.rec(720, em_read(D))
    c.rec(780, S(em_frame(D)[:6], "truncated"))
    return c


def nasty_thingmagic(keepalive):
    rng = random.Random(SEED + 2)
    F01 = 0x01FF
    c = Capture("thingmagic", "nasty", header(
        NASTY_INTRO + " Frames of continuous mode (opcode 22) and of buffered reads (opcode 29) are"
        " mixed in one stream to cover both layouts. Facts used: " + SRC_TM,
        ["0 ms: power-up garbage starting with 00 (not FF), ending with the start of an interrupted"
         " keep-alive (FF 00 22 04) -> skip garbage.",
         "40 ms: continuous-read start acknowledgement (frame reply); 1040 ms keep-alive (frame keepalive).",
         "1100 ms: streamed tag record, flags 01FF, 12-byte EPC, split into records of 1-3 bytes.",
         "1300 ms: good streamed record then, in the same record, a copy with a corrupted frame CRC"
         " -> skip bad_checksum; 1330 ms a good record.",
         "1400 ms: three streamed records back to back in one record, flags 0006 (RSSI+antenna only):"
         " 4-byte EPC on antenna byte 22 (-> 2), 16-byte EPC on 33 (-> 3), zero-length EPC (EPC bit"
         " count 0x0020 = PC + tag CRC only) on 44 (-> 4): its tag column is empty.",
         "1500 ms: antenna byte 03 (high nibble 0 -> report the low nibble, 3).",
         "1600 ms: opcode 29 buffered reply, flags 0006, 3 records (12, 8, 16-byte EPCs on antennas"
         " 11, 22, 11); 1700 ms: opcode 29, flags 0000, 2 records (no RSSI/antenna -> 3-column lines).",
         "1800 ms: record with embedded data (flags 0086: 32 bits of data before the EPC).",
         "1900 ms: PC 3200 (XPC indicator 0x0200) with XPC_W1 2000 between PC and EPC; 1950 ms PC 2200"
         " with XPC_W1 8010 (bit 0x8000 -> XPC_W2 0003 follows). The EPC bit count includes the XPC"
         " words, as MercuryAPI's parseMetadataFromMessage subtracts them from it.",
         "2000 ms: status frames: opcode 22 status 0000 LEN 4 (summary) and a response-type-02 stream"
         " status -> frame status; 2100 ms opcode 22 status 0504 (temperature throttling) -> frame error.",
         "2200 ms: good record, then a record whose EPC bit count (0x0100 = 32 bytes) exceeds the frame"
         " (valid CRC) -> skip bad_record; 2250 ms good record.",
         "2300 ms: good record, then 2400 ms the first 23 bytes of a record frame -> skip truncated."]))
    c.rec(0, S(h("00 00 80 FE 7F 3C 00 0D FF 00 22 04"), "garbage"))
    c.rec(40, F(h("FF 04 2F 00 00 01 22 00 00 6D C3"), "frame\treply"))
    c.rec(1040, F(keepalive, "frame\tkeepalive"))
    c.split(1100, [tm_read(F01, EPC12, rssi=-61, ant=0x11, freq=915750, ts=60, phase=112)], rng)
    good = tm_read(F01, EPC8, rssi=-52, ant=0x22, freq=903250, ts=260, phase=35)
    bad = tm_read(F01, EPC12B, rssi=-67, ant=0x11, freq=921250, ts=261, phase=170, bad_crc=True)
    c.rec(1300, good, S(bad.data, "bad_checksum"))
    c.rec(1330, tm_read(F01, EPC12B, rssi=-66, ant=0x11, freq=921250, ts=290, phase=171))
    c.rec(1400, tm_read(0x0006, EPC4, rssi=-47, ant=0x22), tm_read(0x0006, EPC16, rssi=-70, ant=0x33),
          tm_read(0x0006, EPC0, rssi=-58, ant=0x44))
    c.rec(1500, tm_read(0x0006, EPC12, rssi=-63, ant=0x03))
    c.rec(1600, tm_buffered(0x0006, [(EPC12, -55, 0x11), (EPC8, -72, 0x22), (EPC16, -41, 0x11)]))
    c.rec(1700, tm_buffered(0x0000, [(EPC12B, -50, 0x11), (EPC4, -50, 0x11)]))
    c.rec(1800, tm_read(0x0086, EPC12, rssi=-59, ant=0x11, emb=h("E2801160")))
    c.rec(1900, tm_read(0x0006, EPC12B, rssi=-64, ant=0x11, xpc=(0x2000,)))
    c.rec(1950, tm_read(0x0006, EPC8, rssi=-45, ant=0x22, xpc=(0x8010, 0x0003), pc=0x2200))
    c.rec(2000, F(tm_frame(0x22, 0x0000, h("00 00 00 05")), "frame\tstatus"),
          F(tm_frame(0x22, 0x0000, h("10 00 1B 01 FF 02 00 00 00 00 00 2A")), "frame\tstatus"))
    c.rec(2100, F(tm_frame(0x22, 0x0504, b""), "frame\terror"))
    badrec = tm_stream_bytes(0x0006, tm_record(0x0006, EPC16, rssi=-60, ant=0x11, epc_bits=0x0100))
    c.rec(2200, tm_read(0x0006, EPC8, rssi=-57, ant=0x11), S(badrec, "bad_record"))
    c.rec(2250, tm_read(0x0006, EPC4, rssi=-49, ant=0x44))
    c.rec(2300, tm_read(F01, EPC16, rssi=-68, ant=0x33, freq=926750, ts=1260, phase=5))
    c.rec(2400, S(tm_read(F01, EPC12, rssi=-61, ant=0x11, freq=915750, ts=1360).data[:23], "truncated"))
    return c


def nasty_uhfbb():
    rng = random.Random(SEED + 3)
    epc_bb = h("BB7E0022BB01FF7E3000BB7E")
    c = Capture("uhf-bb", "nasty", header(
        NASTY_INTRO + " Facts used: " + SRC_BB,
        ["0 ms: power-up garbage starting with 00 (not BB), containing BB FF (type > 2) and the start of"
         " an interrupted notice (BB 02 22 00 11 C9 34 00 30) -> skip garbage.",
         "50 ms: error answer 15 (no tag) -> frame no_tag.",
         "100 ms: tag notice (12-byte EPC, -55 dBm) split into records of 1-3 bytes.",
         "200 ms: good notice then, in the same record, a notice with a wrong sum byte (7E present)"
         " -> skip bad_checksum; 230 ms good notice.",
         "300 ms: four notices back to back in one record: 4-byte, 8-byte, 16-byte and zero-length EPC"
         " (PL 5: RSSI, PC 0000, tag CRC; its tag column is empty).",
         "400 ms: notice whose RSSI byte is BB (-69 dBm) and whose EPC contains BB and 7E bytes"
         " (BB7E0022BB01FF7E3000BB7E); framing must follow PL, not search for 7E.",
         "450 ms: error answer with code 17 (our choice of a non-15 code) -> frame error.",
         "500 ms: good notice, then a type 02 cmd 22 notice with PL 3 (valid sum) -> skip bad_record;"
         " 530 ms good notice.",
         "600 ms: stop multi-polling answer -> frame reply.",
         "700 ms: good notice, then 760 ms the first 12 bytes of a notice -> skip truncated."]))
    c.rec(0, S(h("00 FF 7E 7E BB FF 00 0D 0A BB 02 22 00 11 C9 34 00 30"), "garbage"))
    c.rec(50, F(h("BB 01 FF 00 01 15 16 7E"), "frame\tno_tag"))
    c.split(100, [bb_read(-55, EPC12)], rng)
    c.rec(200, bb_read(-49, EPC8), S(bb_notice_bytes(-60, EPC12B, bad_sum=True), "bad_checksum"))
    c.rec(230, bb_read(-60, EPC12B))
    c.rec(300, bb_read(-62, EPC4), bb_read(-48, EPC8), bb_read(-71, EPC16), bb_read(-66, EPC0))
    c.rec(400, bb_read(-69, epc_bb))
    c.rec(450, F(bb_frame(0x01, 0xFF, b"\x17"), "frame\terror"))
    badrec = bb_frame(0x02, 0x22, h("C9 30 00"))
    c.rec(500, bb_read(-57, EPC12), S(badrec, "bad_record"))
    c.rec(530, bb_read(-53, EPC16))
    c.rec(600, F(h("BB 01 28 00 01 00 2A 7E"), "frame\treply"))
    c.rec(700, bb_read(-74, EPC12B))
    c.rec(760, S(bb_notice_bytes(-56, EPC12)[:12], "truncated"))
    return c


def nasty_chafon():
    rng = random.Random(SEED + 4)
    c = Capture("chafon", "nasty", header(
        NASTY_INTRO + " RSSI (288) family. Facts used: " + SRC_CF,
        ["0 ms: power-up garbage starting with 00 (< 5, cannot be a Len) -> skip garbage.",
         "60 ms: answer to the work-mode command 76 (05 00 76 00 + CRC) -> frame reply.",
         "100 ms: multi-frame inventory answer: status 03 (more frames follow; Ant 01, Num 3: 4-, 8- and"
         " 12-byte EPCs) split into records of 1-3 bytes, then 140 ms status 01 (Ant 01, Num 2: 16- and"
         " 12-byte EPCs).",
         "200 ms: inventory answer status 01, Ant 01, Num 0 -> frame no_tag.",
         "300 ms: good answer (Ant 02) then, in the same record, a copy with a corrupted CRC -> skip"
         " bad_checksum; 330 ms good answer (Ant 04 -> antenna 3).",
         "400 ms: status F8 (antenna error) -> frame error.",
         "500 ms: good answer, then an answer claiming Num 2 with data for one tag (valid CRC) -> skip"
         " bad_record; 530 ms good answer (Ant 08 -> antenna 4).",
         "600 ms: answer to work-mode command 76 (real-time) -> frame reply; 700 ms four real-time EE"
         " frames back to back in one record on antennas 01, 02, 04, 08 (-> 1..4) with 12-, 8-, 16- and"
         " 4-byte EPCs.",
         "800 ms: EE frame with Ant 10 (not one of the four bitmask values) -> antenna '-'.",
         "900 ms: EE heartbeat (status 28; data: packet no. u32, antenna status u8, total count u32 -"
         " field widths our choice) -> frame heartbeat.",
         "1000 ms: EE read, then 1050 ms the first 10 bytes of an EE frame -> skip truncated."]))
    c.rec(0, S(h("00 00 03 01 FF 00 FE 80 00 01 02 13 00 01 03"), "garbage"))
    c.rec(60, F(cf_frame(0x76, 0x00, b""), "frame\treply"))
    c.split(100, [cf_inv288(0x03, 0x01, [(EPC4, 0x5A), (EPC8, 0x48), (EPC12, 0x66)])], rng)
    c.rec(140, cf_inv288(0x01, 0x01, [(EPC16, 0x41), (EPC12B, 0x6D)]))
    c.rec(200, F(cf_frame(0x01, 0x01, h("01 00")), "frame\tno_tag"))
    c.rec(300, cf_inv288(0x01, 0x02, [(EPC12, 0x60)]),
          S(cf_inv288(0x01, 0x02, [(EPC8, 0x55)], bad_crc=True).data, "bad_checksum"))
    c.rec(330, cf_inv288(0x01, 0x04, [(EPC8, 0x55)]))
    c.rec(400, F(cf_frame(0x01, 0xF8, b""), "frame\terror"))
    badrec = cf_frame(0x01, 0x01, bytes([0x01, 0x02, len(EPC12)]) + EPC12 + b"\x50")
    c.rec(500, cf_inv288(0x01, 0x01, [(EPC4, 0x62)]), S(badrec, "bad_record"))
    c.rec(530, cf_inv288(0x01, 0x08, [(EPC16, 0x47)]))
    c.rec(600, F(cf_frame(0x76, 0x00, b""), "frame\treply"))
    c.rec(700, cf_rt(0x01, EPC12, 0x63), cf_rt(0x02, EPC8, 0x4E), cf_rt(0x04, EPC16, 0x44), cf_rt(0x08, EPC4, 0x69))
    c.rec(800, cf_rt(0x10, EPC12B, 0x58))
    c.rec(900, F(cf_frame(0xEE, 0x28, h("00 00 00 2A 0F 00 00 01 F4")), "frame\theartbeat"))
    c.rec(1000, cf_rt(0x01, EPC12B, 0x5C))
    c.rec(1050, S(cf_rt(0x02, EPC12, 0x52).data[:10], "truncated"))
    return c


# ---------------- bursts ----------------

def tty_records(frames, times, baud, rng, stall_at=None, stall_ms=0, imin=1, imax=16, cap=4096):
    """Model what read() on a tty returns. Bytes leave the reader at `baud` (8N1: 10 bits a byte;
    a frame waits while the line is busy); the host calls read() every imin..imax ms (the USB-serial
    latency timer), optionally stalls once, and each read() returns what has arrived, at most `cap`
    bytes (the N_TTY buffer size); after a capped read the next read() follows 1 ms later.
    Offsets are integer ms, strictly increasing."""
    bpm = baud / 10000.0
    arr, free = [], 0.0
    for f, t in zip(frames, times):
        start = max(t, free)
        arr.extend(start + (k + 1) / bpm for k in range(len(f)))
        free = start + len(f) / bpm
    stream = b"".join(frames)
    recs, pos, t, stalled, capped = [], 0, 0, stall_at is None, False
    while pos < len(stream):
        t += 1 if capped else rng.randint(imin, imax)
        if not stalled and t >= stall_at:
            t += stall_ms
            stalled = True
        avail = bisect.bisect_right(arr, t)
        capped = False
        if avail > pos:
            end = min(avail, pos + cap)
            capped = end < avail
            recs.append((t, stream[pos:end]))
            pos = end
    return recs


def population(rng, n):
    seen, out = set(), []
    while len(out) < n:
        r = rng.random()
        if r < 0.80:    # SGTIN-96 style, header 0x30
            epc = bytes([0x30, 0x34]) + bytes(rng.randrange(256) for _ in range(10))
        elif r < 0.92:  # 128-bit EPC
            epc = bytes([0xE2, 0x80]) + bytes(rng.randrange(256) for _ in range(14))
        else:           # 64-bit EPC
            epc = bytes([0x35]) + bytes(rng.randrange(256) for _ in range(7))
        if epc not in seen:
            seen.add(epc)
            out.append(epc)
    return out


def burst_schedule(rng, ntags=300, nreads=1000, period_ms=2.0):
    """1000 reads at 500 reads/s over 2 s, every one of the 300 tags read at least once; each
    tag has a base RSSI and a home antenna (15 % of its reads come from another antenna)."""
    weights = [rng.uniform(0.2, 3.0) for _ in range(ntags)]
    idx = list(range(ntags)) + rng.choices(range(ntags), weights, k=nreads - ntags)
    rng.shuffle(idx)
    times = [k * period_ms + rng.uniform(0.0, period_ms * 0.95) for k in range(nreads)]
    base = [rng.uniform(-72.0, -43.0) for _ in range(ntags)]
    home = [rng.randint(1, 4) for _ in range(ntags)]
    reads = []
    for k, ti in enumerate(idx):
        ant = home[ti] if rng.random() < 0.85 else rng.choice([a for a in (1, 2, 3, 4) if a != home[ti]])
        reads.append((times[k], ti, base[ti] + rng.uniform(-3.0, 3.0), ant))
    return reads


def clamp(v, lo, hi):
    return max(lo, min(hi, v))


def burst(proto, baud, seed):
    rng = random.Random(seed)
    epcs = population(rng, 300)
    reads = burst_schedule(rng)
    items, times = [], []
    hop = [902750 + 500 * k for k in range(50)]
    for t, ti, rssi_f, ant in reads:
        rssi = int(round(clamp(rssi_f, -75.0, -40.0)))
        if proto == "thingmagic":
            items.append(tm_read(0x01FF, epcs[ti], rssi=rssi, ant=(ant << 4) | ant, freq=rng.choice(hop),
                                 ts=int(t), phase=rng.randrange(0, 180)))
        elif proto == "uhf-bb":
            items.append(bb_read(rssi, epcs[ti]))
        else:  # chafon real-time push; raw RSSI 0x40..0x6D, larger = stronger
            raw = int(round(clamp(0x40 + (rssi_f + 75.0) * (0x6D - 0x40) / 35.0, 0x40, 0x6D)))
            items.append(cf_rt({1: 0x01, 2: 0x02, 3: 0x04, 4: 0x08}[ant], epcs[ti], raw))
        times.append(t)
    total = sum(len(i.data) for i in items)
    rate = total / 2000.0
    stall = int(5200 / rate) + 1  # long enough for > 4096 bytes to pile up
    recs = tty_records([i.data for i in items], times, baud, rng, stall_at=900, stall_ms=stall)
    assert max(len(r) for _, r in recs) == 4096, "the stall must produce at least one full 4 KiB record"
    return items, recs, stall


BURST_TEXT = ("Synthetic burst, fixed random seed %d: 300 distinct tags (80 %% 12-byte SGTIN-style EPCs, 12 %%"
              " 16-byte, 8 %% 8-byte), 1000 reads at 500 reads/s for 2 s, every tag read at least once;"
              " each tag has a base RSSI in -72..-43 dBm, +-3 dB per read, clamped to -75..-40; antennas 1..4"
              " (a home antenna, 15 %% of reads on another). Records are what read() on a tty would return:"
              " bytes leave the reader at %d baud (8N1), the host reads every 1-16 ms and stalls once for"
              " %d ms near 900 ms, and a read returns at most 4096 bytes (N_TTY buffer), so records cut frames"
              " anywhere and some are exactly 4096 bytes. Offsets in ms, strictly increasing. ")


def burst_thingmagic():
    items, recs, stall = burst("thingmagic", 921600, SEED + 10)
    c = Capture("thingmagic", "burst-300-tags", header(
        BURST_TEXT % (SEED + 10, 921600, stall) + CONSTRUCTED + " Facts used: " + SRC_TM,
        ["Every frame is a continuous-mode streamed record (opcode 22, option 10, search flags 001B,"
         " metadata flags 01FF as in SparkFun's startReading() blob): read count 1, RSSI i8 dBm, antenna"
         " byte port<<4|port (11/22/33/44), frequency hopping 902750..927250 kHz, timestamp = ms since"
         " start, phase, protocol 5, 0 bits of embedded data, GPIO 00; PC length bits match the EPC;"
         " tag CRC = Gen2 CRC-16 over PC+EPC.",
         "921600 baud is one of the rates MercuryAPI probes; 115200 could not carry 500 such frames/s."]))
    c.raw_records(items, recs)
    return c


def burst_uhfbb():
    items, recs, stall = burst("uhf-bb", 230400, SEED + 11)
    c = Capture("uhf-bb", "burst-300-tags", header(
        BURST_TEXT % (SEED + 11, 230400, stall) + CONSTRUCTED + " Facts used: " + SRC_BB,
        ["Every frame is a multi-polling tag notice (Type 02, Cmd 22): RSSI i8 dBm, PC (length bits match"
         " the EPC), EPC, tag CRC (Gen2 CRC-16 over PC+EPC). The notice has no antenna field, so the"
         " antenna column is '-' although the schedule assigned antennas.",
         "230400 baud is an assumption (unverified for these modules): the 115200 default cannot carry"
         " 500 notices/s."]))
    c.raw_records(items, recs)
    return c


def burst_chafon():
    items, recs, stall = burst("chafon", 115200, SEED + 12)
    c = Capture("chafon", "burst-300-tags", header(
        BURST_TEXT % (SEED + 12, 115200, stall) + CONSTRUCTED + " Facts used: " + SRC_CF,
        ["RSSI (288) family in real-time mode: every frame is Len 00 EE 00 Ant len EPC RSSI CRC; Ant is"
         " the bitmask 01/02/04/08 for antennas 1..4; the RSSI byte is the raw unit 0x40..0x6D (larger ="
         " stronger), mapped linearly from the schedule's dBm; reported as raw:<decimal>.",
         "115200 baud (set by command; the 57600 default cannot carry 500 frames/s)."]))
    c.raw_records(items, recs)
    return c


def burst_em4100():
    rng = random.Random(SEED + 13)
    cards, seen = [], set()
    while len(cards) < 100:
        cd = bytes([rng.choice([0x01, 0x04, 0x0F, 0x1A, 0x3C, 0x62, 0x7F, 0xAB])]) + \
            bytes(rng.randrange(256) for _ in range(4))
        if cd not in seen:
            seen.add(cd)
            cards.append(cd)
    reps = [10] * 100
    for _ in range(300):  # vary the repeat count per card (5..15), keep the total at 1000
        a, b = rng.randrange(100), rng.randrange(100)
        if a != b and reps[a] < 15 and reps[b] > 5:
            reps[a] += 1
            reps[b] -= 1
    assert sum(reps) == 1000
    items, times, t = [], [], 0.0
    for cd, n in zip(cards, reps):
        for _ in range(n):
            items.append(em_read(cd))
            times.append(t)
            t += rng.uniform(50.0, 65.0)
        t += rng.uniform(250.0, 900.0)
    recs = tty_records([i.data for i in items], times, 9600, rng)
    c = Capture("em4100", "burst-100-cards", header(
        "Synthetic burst, fixed random seed %d: 100 distinct EM4100 cards presented one after another to"
        " an RDM6300 (14-byte frames, 9600 baud 8N1); while a card is in the field the reader repeats its"
        " frame every 50-65 ms (REFERENCE-READERS.md section 2), 5-15 times per card, 1000 reads in all;"
        " 250-900 ms between cards. 500 reads/s is impossible at 9600 baud, so this burst is 1000 reads of"
        " 100 cards at the reader's real repeat rate. Records are what read() on a tty would return (bytes"
        " arrive at 9600 baud, the host reads every 1-16 ms), so frames are cut anywhere. Offsets in ms,"
        " strictly increasing. " % (SEED + 13) + CONSTRUCTED + " Facts used: " + SRC_EM))
    c.raw_records(items, recs)
    return c


# ============================================================================================
# READMEs, verification, main
# ============================================================================================

README = {
    "em4100": dict(
        title="em4100: 125 kHz ASCII readers (RDM6300/RDM630, ID-12LA/ID-20LA/ID-3LA)",
        what={
            "reference-examples": "the two example frames of REFERENCE-READERS.md section 2, byte-exact: card"
                                  " 62E3086CED in RDM6300 form (14 bytes) and in ID-12LA form (16 bytes)",
            "nasty": "power-up garbage, a frame split into 1-3 byte records, a bad checksum right after a"
                     " good frame, frames back to back, lowercase hex, the `;D` clone checksum (not_hex), a"
                     " missing LF before ETX (bad_frame), a truncated frame at the end",
            "burst-100-cards": "100 cards presented in turn to an RDM6300, 5-15 repeats each (1000 reads),"
                               " 9600 baud, records as a tty returns them",
        },
        sources=[
            "REFERENCE-READERS.md section 2, which compiles the sources below.",
            "Seeed 125 kHz RFID module UART wiki / RDM630 datasheet: the 14-byte form and the example"
            " card 62E3086CED with checksum 08.",
            "ID Innovations ID-12 datasheet format line (quoted on forum.arduino.cc \"RFID format\"),"
            " slab.concordia.ca ID-12 notes: the 16-byte ID-12LA form with CR LF before ETX.",
            "Public forum posts on RDM6300 clones (forum.seeedstudio.com \"RDM630 - Checksum Problems\","
            " forum.hobbycomponents.com RDM6300 thread): wrong checksums, including `;D`.",
            "The RDM6300 repeat interval (about 50-65 ms) used by the burst is the figure given in"
            " REFERENCE-READERS.md section 2.",
        ]),
    "thingmagic": dict(
        title="thingmagic: ThingMagic/JADAK Mercury embedded-module serial protocol (M6e, M6e Nano, M7e)",
        what={
            "reference-examples": "the start-reading acknowledgement, the SparkFun streamed tag-record"
                                  " example and the keep-alive (CRC computed), byte-exact",
            "nasty": "garbage, a split record, a bad CRC right after a good frame, back-to-back frames,"
                     " 0-, 4-, 8-, 12-, 16-byte EPCs, antenna bytes 22/33/44/03, two opcode-29 buffered"
                     " replies (flags 0006 with 3 records, flags 0000), embedded data (flag 0080), XPC_W1 and"
                     " XPC_W1+W2, status and error frames, bad_record, a truncated frame at the end",
            "burst-300-tags": "1000 streamed records (flags 01FF) of 300 tags in 2 s at 921600 baud, records"
                              " as a tty returns them (up to 4096 bytes)",
        },
        sources=[
            "MercuryAPI C (ThingMagic, MIT; copy at GitHub tosog/mercury) `c/src/api/serial_reader_l3.c`:"
            " `tm_crc` (cited by REFERENCE-READERS.md); `TMR_SR_parseMetadataOnly` (metadata field order)"
            " and `TMR_SR_parseMetadataFromMessage`, which we read ourselves to settle one point the"
            " spec leaves open: the EPC bit count includes the PC, any XPC words and the tag CRC, so"
            " EPC bytes = bits/8 - 4 - 2 per XPC word.",
            "SparkFun Simultaneous RFID Tag Reader Library `src/SparkFun_UHF_RFID_Reader.cpp` @ d52c969:"
            " the parseResponse() example frame, startReading() and its acknowledgement.",
            "REFERENCE-READERS.md section 3: frame layout, CRC and its test vectors, status words, opcodes,"
            " streamed and buffered reply layouts, the example frames.",
            "Our choices (not from a source): EPCs, RSSI/antenna values, the LEN-4 status frame's data, the"
            " XPC word values, the embedded data bytes.",
        ]),
    "uhf-bb": dict(
        title="uhf-bb: \"BB ... 7E\" modules (MagicRF M100/QM100 family: YRM100, JRD-4035, R200, EL-UHF-RMT01)",
        what={
            "reference-examples": "the M100 manual tag-notice example, the no-tag error answer and the stop"
                                  " answer, byte-exact",
            "nasty": "garbage, a split notice, a bad sum right after a good frame, back-to-back notices,"
                     " 0-, 4-, 8-, 12-, 16-byte EPCs, BB and 7E inside the payload, error answers,"
                     " bad_record (PL 3), the stop answer, a truncated frame at the end",
            "burst-300-tags": "1000 tag notices of 300 tags in 2 s at 230400 baud, records as a tty returns"
                              " them (up to 4096 bytes)",
        },
        sources=[
            "MagicRF M100/QM100 firmware manual as restated in public drivers: frame layout, sum, tag"
            " notice, commands and example frames (via REFERENCE-READERS.md section 4).",
            "electron.id EL-UHF-RMT01 protocol pages.",
            "Our choices (not from a source): EPCs, RSSI values, error code 17 for a non-15 error answer,"
            " the 230400 baud of the burst.",
        ]),
    "chafon": dict(
        title="chafon: \"Len Adr reCmd Status Data CRC-16\" readers (UHFReader18/CF-RU5102 classic;"
              " UHFReader288/86, SID UR RSSI family)",
        what={
            "reference-examples": "RSSI (288) family: the wabson/chafon-rfid 288 inventory example, byte-exact",
            "reference-examples-classic": "classic family (decode with the classic layout): the"
                                          " wabson/chafon-rfid UHFReader18 inventory example, byte-exact",
            "nasty": "RSSI family: garbage starting below 5, a multi-frame inventory answer (status 03 then"
                     " 01) split into 1-3 byte records, no_tag, a bad CRC right after a good frame, F8 error,"
                     " bad_record, work-mode replies, real-time EE frames on antennas 1..4 back to back, an"
                     " unknown antenna mask, a heartbeat, a truncated frame at the end",
            "burst-300-tags": "RSSI family real-time mode: 1000 EE frames of 300 tags in 2 s at 115200 baud,"
                              " records as a tty returns them (up to 4096 bytes)",
        },
        sources=[
            "REFERENCE-READERS.md section 5: frame layout, Len and CRC-16/MCRF4XX rules, status codes,"
            " both families' inventory data, the Ant bitmask, real-time mode (76) with EE frames and"
            " heartbeat. It compiles: Chafon UHFReader18 User's Manual V2.0; SID UR-series user manual"
            " v1.14; GitHub wabson/chafon-rfid; GitHub Timereversal/rfidtime.",
            "GitHub wabson/chafon-rfid tests @ 05b55f3: both example frames (byte-exact in the"
            " reference-examples captures).",
            "Our choices (not from a source): the heartbeat's field widths, the raw RSSI values, the"
            " Ant 10 case, all EPCs.",
        ]),
}


def write_readme(folder, caps):
    r = README[folder]
    L = ["# " + r["title"], "",
         "Test fixtures for the `%s` decoder: captures in the `scangate-capture v1 serial` format and the"
         " decoder output they must give (`X.expected`, format of the decoder output spec, tab-separated)."
         % folder,
         "They are **constructed** from the public frame layouts and example frames collected in"
         " `REFERENCE-READERS.md`, not recorded from hardware, and were generated by `../tools/gen_fixtures.py`"
         " (python3, standard library, fixed random seed), which was written from the spec without"
         " looking at scangate's decoder.", "",
         "| capture | content | reads | frames | skips |", "|---|---|---|---|---|"]
    for c in caps:
        n = c.counts()
        L.append("| `%s.cap` | %s | %d | %d | %d |" % (c.name, r["what"][c.name], n["reads"], n["frames"], n["skips"]))
    L += ["", "## How the expected output was made", "",
          "Each capture is assembled from pieces whose output is known by construction (a read, a"
          " frame, or skipped bytes with their cause); the skip-run rule (one `skip` line per run of"
          " skipped bytes, reason of the run's first byte, written before the next read/frame or at the"
          " end) is applied while assembling. The generator then re-reads each written `.cap`, decodes it"
          " with a small independent reference decoder written from the spec, and asserts both agree; it"
          " also asserts every checksum routine against the vectors and examples in"
          " `REFERENCE-READERS.md` first. Each `.cap` header says which case sits at which offset.", "",
          "## Sources", ""]
    L += ["- " + s for s in r["sources"]]
    with open(os.path.join(HERE, folder, "README.md"), "w") as f:
        f.write("\n".join(L) + "\n")


def tryf_for(c):
    if c.folder == "em4100":
        return try_em4100
    if c.folder == "thingmagic":
        return try_thingmagic
    if c.folder == "uhf-bb":
        return try_uhfbb
    return make_try_chafon("classic" in c.name)


def verify_written(c):
    base = os.path.join(HERE, c.folder, c.name)
    stream = read_cap(base + ".cap")
    exp = read_expected(base + ".expected")
    assert stream == bytes(c.stream)
    assert exp == c.expected
    tryf = tryf_for(c)
    got, eof = ref_decode(stream, tryf)
    if got != exp:
        for k, (a, b) in enumerate(zip(got, exp)):
            if a != b:
                sys.exit("MISMATCH %s line %d: decoder %r, constructed %r" % (base, k, a, b))
        sys.exit("MISMATCH %s: length decoder %d constructed %d" % (base, len(got), len(exp)))
    if c.truncated_at is not None:
        assert eof == c.truncated_at, (base, eof, c.truncated_at)
        for j in range(eof, len(stream)):  # no complete frame hides in the truncated tail
            assert tryf(stream, j)[0] in ("need", "skip"), (base, j)
        assert exp[-1] == "skip\ttruncated"
    else:
        assert eof is None, (base, "stream ends inside a candidate frame", eof)
    for ext in (".cap", ".expected"):
        assert os.path.getsize(base + ext) < 200 * 1024, base + ext
    # burst shape checks
    if c.name.startswith("burst"):
        reads = [l for l in exp if l.startswith(("epc", "em4100"))]
        assert len(reads) == len(exp) == 1000
        assert len(set(l.split("\t")[1] for l in reads)) == (100 if c.folder == "em4100" else 300)
        offs = [t for t, _ in c.records]
        assert all(a < b for a, b in zip(offs, offs[1:])), "offsets strictly increasing"
        assert max(len(r) for _, r in c.records) <= 4096
        for l in reads:
            f = l.split("\t")
            if c.folder in ("thingmagic", "uhf-bb"):
                assert -75.0 <= float(f[3]) <= -40.0
            if c.folder == "chafon":
                assert 0x40 <= int(f[3][4:]) <= 0x6D
            if c.folder in ("thingmagic", "chafon"):
                assert f[4] in "1234"
    return len(stream)


def main():
    verify_checksums()
    c_tm_ref, keepalive = ref_thingmagic()
    c_cf_ref, c_cf_cls = ref_chafon()
    caps = {
        "em4100": [ref_em4100(), nasty_em4100(), burst_em4100()],
        "thingmagic": [c_tm_ref, nasty_thingmagic(keepalive), burst_thingmagic()],
        "uhf-bb": [ref_uhfbb(), nasty_uhfbb(), burst_uhfbb()],
        "chafon": [c_cf_ref, c_cf_cls, nasty_chafon(), burst_chafon()],
    }
    print("checksum vectors passed:")
    for v in VERIFIED:
        print("  ok  " + v)
    print("\ncaptures (reads / frames / skips, bytes, records):")
    for folder, cs in caps.items():
        for c in cs:
            c.finish()
            c.write()
            nbytes = verify_written(c)
            n = c.counts()
            skips = {}
            for l in c.expected:
                if l.startswith("skip\t"):
                    skips[l[5:]] = skips.get(l[5:], 0) + 1
            print("  %-12s %-28s reads %4d  frames %2d  skips %2d %s  (%d bytes, %d records)"
                  % (folder, c.name + ".cap", n["reads"], n["frames"], n["skips"],
                     " ".join("%s=%d" % kv for kv in sorted(skips.items())), nbytes, len(c.records)))
        write_readme(folder, cs)
    print("\nall captures decode (reference decoder) to their constructed .expected files")


if __name__ == "__main__":
    main()
