//! Repeat suppression and zone arbitration: reads in, passes out.
//!
//! A **pass** is the run of reads of one tag in one arbitration group with gaps shorter than
//! the window. It ends after `window_ms` without a read of it, when it has lasted
//! `max_pass_ms` (a tag parked in the field yields one pass per `max_pass_ms`), when it
//! **moves** to another zone, or when the table is full and it is the longest idle (a forced
//! close: emitted, never dropped).
//!
//! **Zones and arbitration.** Every read names its zone (a location: a source, or an antenna
//! through the antenna → location map; two antennas on both sides of one belt are one zone).
//! Within a group the pass goes to the zone with the strongest peak RSSI (after each source's
//! calibration offset); ties go to more reads, then the earlier read. A pass *moves* when
//! another zone's mean RSSI stays above the current zone's by `zone_margin_db` for
//! `zone_dwell_ms` (the idea of EdgeX's RFID inventory service: a mean per zone, with a bonus
//! for the incumbent that fades while the incumbent is not read): the pass at the old zone
//! ends and a new one opens at the new zone with the reads the new zone had meanwhile, so a
//! bag carried from one portal into an overlapping next one gives two events, in order.
//!
//! **Modes.** `aggregate` emits a pass when it ends; `first` emits at the first read of a pass
//! and swallows the rest; `off` emits every read as a pass of one.
//!
//! The suppressor is synchronous: every call takes the time (`at_ms`, milliseconds of one
//! clock that only moves forward, e.g. the reads' wall time as stamped by the sources) and
//! nothing else happens between calls. [`Suppressor::tick`] ends the passes whose window ran
//! out. Memory is bounded by `max_tracked`: one slot per open pass, about 100 bytes each
//! (BENCHMARKS.md), allocated once.
//!
//! Counters (for `/metrics` and `status`): reads in, below floor, suppressed, passes emitted,
//! forced closes, moves, tracked now ([`Counters`]).

use crate::event::ReadKind;
use hashbrown::HashTable;
use serde::{Deserialize, Serialize};

pub mod stage;

/// How passes are emitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Aggregate,
    First,
    Off,
}

/// Per-source rules (indexed by the read's `rule`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rule {
    pub mode: Mode,
    /// Quiet time that ends a pass, ms.
    pub window_ms: u32,
    /// Added to the reader's RSSI (calibration between reader models), centi-dB.
    pub offset_cdb: i16,
    /// Reads weaker than this (after calibration) are dropped, centi-dBm.
    pub floor_cdbm: Option<i16>,
}

/// Settings shared by every source.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub max_pass_ms: u32,
    /// Open passes tracked at most.
    pub max_tracked: usize,
    /// How much stronger (mean RSSI) another zone must be to take a pass, centi-dB.
    pub zone_margin_cdb: i16,
    /// How long it must stay stronger, ms.
    pub zone_dwell_ms: u32,
    /// How fast the incumbent zone's mean fades while it is not read, centi-dB per second.
    pub fade_cdb_per_s: u32,
    pub rules: Vec<Rule>,
}

/// One read as the suppressor sees it.
#[derive(Debug, Clone, Copy)]
pub struct ReadIn<'a> {
    pub tag: &'a str,
    pub kind: ReadKind,
    /// Arbitration group.
    pub group: u16,
    /// Zone (location) of the read.
    pub zone: u16,
    /// Who read it (source and antenna, interned by the caller): reported for the peak.
    pub reader: u16,
    /// Index into [`Settings::rules`] (the source's rule).
    pub rule: u16,
    pub rssi_dbm: Option<f32>,
    /// Interned symbology (0: none).
    pub symbology: u8,
    pub at_ms: i64,
}

/// Why a pass was emitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// `window_ms` without a read.
    Quiet,
    /// It lasted `max_pass_ms`.
    MaxPass,
    /// Another zone took the tag over.
    Moved,
    /// The table was full and this was the longest-idle pass.
    Forced,
    /// `first` mode: the first read (the rest of the pass is swallowed).
    First,
    /// `off` mode: every read.
    Single,
    /// [`Suppressor::flush`] (shutdown).
    Flushed,
}

/// An emitted pass.
#[derive(Debug, Clone, PartialEq)]
pub struct Pass {
    pub tag: String,
    pub kind: ReadKind,
    pub group: u16,
    /// The winning zone.
    pub zone: u16,
    /// The reader of the peak read.
    pub reader: u16,
    pub first_ms: i64,
    pub last_ms: i64,
    pub read_count: u32,
    /// Peak RSSI after calibration, centi-dBm (None: the reads had none).
    pub peak_cdbm: Option<i16>,
    pub symbology: u8,
    pub end: End,
}

/// What the suppressor counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub reads_in: u64,
    pub below_floor: u64,
    /// Reads that went into a pass already open (not emitted on their own).
    pub suppressed: u64,
    pub passes: u64,
    pub forced: u64,
    pub moves: u64,
}

/// The reads of one zone within a saved pass (see [`SavedPass`]); `zone` and `reader` are the
/// caller's interned indices, `peak` centi-dBm (`i16::MIN`: none), `first` ms after the pass
/// began.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedZone {
    pub zone: u16,
    pub peak: i16,
    pub reader: u16,
    pub count: u32,
    pub first: u32,
}

/// An open pass as written to the spool ([`Suppressor::take_changes`]) and put back at start
/// ([`Suppressor::restore`]): everything the suppressor keeps about it, so a restored pass
/// goes on exactly as if there had been no restart. Times: `first_ms` on the caller's clock,
/// the others ms after it. `group`, `rule`, zones, readers and `symbology` are the caller's
/// interned indices (the caller maps them to names when it saves and back when it restores).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedPass {
    pub tag: String,
    pub kind: ReadKind,
    pub group: u16,
    pub rule: u16,
    pub symbology: u8,
    pub first_ms: i64,
    pub last: u32,
    pub base_last: u32,
    pub count: u32,
    pub hold: SavedZone,
    pub merged: SavedZone,
    pub chal: SavedZone,
    pub hold_mean: i16,
    pub chal_mean: i16,
    pub chal_last: u32,
    pub chal_since: u32,
    /// `first` mode: its event was already emitted.
    pub emitted: bool,
}

impl SavedPass {
    /// The last read, on the caller's clock.
    pub fn last_ms(&self) -> i64 {
        self.first_ms.saturating_add(self.last as i64)
    }

    /// Whether the fields hold together as the suppressor leaves them (a row damaged on
    /// flash may still decode): counts add up, offsets are ordered, times are in range.
    pub fn is_consistent(&self) -> bool {
        let zones = [self.hold, self.merged, self.chal];
        let reads: u64 = zones
            .iter()
            .filter(|z| z.zone != NO_ZONE)
            .map(|z| z.count as u64)
            .sum();
        let zone_ok = |z: &SavedZone| {
            z.zone == NO_ZONE || (z.count >= 1 && z.first <= self.last && z.count <= self.count)
        };
        self.hold.zone != NO_ZONE
            && self.count >= 1
            && self.count < u32::MAX / 2
            && reads <= self.count as u64
            && zones.iter().all(zone_ok)
            && self.base_last <= self.last
            && self.chal_last <= self.last
            && (self.chal.zone == NO_ZONE || self.chal.first <= self.chal_last)
            && (self.chal_since == NIL || self.chal_since <= self.last)
            && self.last < u32::MAX / 2
            && self.first_ms.checked_add(self.last as i64).is_some()
            && (-(1i64 << 50)..(1i64 << 50)).contains(&self.first_ms)
            && !self.tag.is_empty()
    }
}

/// What changed in the open passes since the last [`Suppressor::take_changes`]: the passes
/// opened or updated (their whole state) and the keys (group, tag) of logged passes that
/// closed. Applying `closed` before `open` to the previous state gives the new state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Changes {
    pub open: Vec<SavedPass>,
    pub closed: Vec<(u16, String)>,
}

/// A bit per slot.
#[derive(Default)]
struct Bits(Vec<u64>);

impl Bits {
    fn get(&self, i: u32) -> bool {
        self.0
            .get(i as usize / 64)
            .is_some_and(|w| w >> (i % 64) & 1 == 1)
    }

    /// Set bit `i`; true if it was clear.
    fn set(&mut self, i: u32) -> bool {
        let w = i as usize / 64;
        if w >= self.0.len() {
            self.0.resize(w + 1, 0);
        }
        let was = self.0[w] >> (i % 64) & 1 == 1;
        self.0[w] |= 1 << (i % 64);
        !was
    }

    fn clear(&mut self, i: u32) {
        if let Some(w) = self.0.get_mut(i as usize / 64) {
            *w &= !(1 << (i % 64));
        }
    }
}

/// Change tracking for persistence (off unless [`Suppressor::track_changes`]).
#[derive(Default)]
struct Tracking {
    on: bool,
    /// Slots changed since the last take.
    dirty: Bits,
    dirty_list: Vec<u32>,
    /// Slots whose pass is in the log (a close must be logged).
    logged: Bits,
    closed: Vec<(u16, String)>,
}

/// No RSSI.
const NONE: i16 = i16::MIN;
const NIL: u32 = u32::MAX;

/// Longest EPC kept inline, bytes (a 96-bit EPC is 12; longer ones go to the heap).
const INLINE: usize = 14;

/// An EPC in uppercase hex (up to 28 digits) kept as bytes inline; anything else in the
/// suppressor's text arena (16 bytes either way).
#[derive(Debug, Clone, PartialEq, Eq)]
enum TagBuf {
    Hex { len: u8, bytes: [u8; INLINE] },
    Other(u32),
}

/// A tag as looked up: packed once per read.
enum Key<'a> {
    Hex(u8, [u8; INLINE]),
    Other(&'a str),
}

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

impl TagBuf {
    /// Uppercase hex of even length up to 28 digits packs inline.
    fn pack(tag: &str) -> Option<(u8, [u8; INLINE])> {
        let b = tag.as_bytes();
        if b.len() > 2 * INLINE || !b.len().is_multiple_of(2) {
            return None;
        }
        let mut out = [0u8; INLINE];
        for (i, pair) in b.chunks_exact(2).enumerate() {
            out[i] = nibble(pair[0])? << 4 | nibble(pair[1])?;
        }
        Some((b.len() as u8 / 2, out))
    }
}

/// Tags that are not short uppercase hex (barcodes, long EPCs): one slot per open pass.
#[derive(Default)]
struct Texts {
    texts: Vec<Box<str>>,
    free: Vec<u32>,
}

impl Texts {
    fn store(&mut self, key: &Key<'_>) -> TagBuf {
        match key {
            Key::Hex(len, bytes) => TagBuf::Hex {
                len: *len,
                bytes: *bytes,
            },
            Key::Other(s) => {
                let t: Box<str> = (*s).into();
                match self.free.pop() {
                    Some(i) => {
                        self.texts[i as usize] = t;
                        TagBuf::Other(i)
                    }
                    None => {
                        self.texts.push(t);
                        TagBuf::Other((self.texts.len() - 1) as u32)
                    }
                }
            }
        }
    }

    fn release(&mut self, tag: &TagBuf) {
        if let TagBuf::Other(i) = tag {
            self.texts[*i as usize] = Box::from("");
            self.free.push(*i);
        }
    }

    fn text_of(&self, tag: &TagBuf) -> &str {
        match tag {
            TagBuf::Hex { .. } => "",
            TagBuf::Other(i) => &self.texts[*i as usize],
        }
    }

    fn is(&self, tag: &TagBuf, key: &Key<'_>) -> bool {
        match (tag, key) {
            (TagBuf::Hex { len, bytes }, Key::Hex(l, b)) => len == l && bytes == b,
            (TagBuf::Other(i), Key::Other(t)) => *self.texts[*i as usize] == **t,
            _ => false,
        }
    }

    fn text(&self, tag: &TagBuf) -> String {
        match tag {
            TagBuf::Hex { len, bytes } => crate::protocol::hex_upper(&bytes[..*len as usize]),
            TagBuf::Other(i) => self.texts[*i as usize].to_string(),
        }
    }

    fn hash(&self, group: u16, tag: &TagBuf) -> u64 {
        match tag {
            TagBuf::Hex { len, bytes } => hash_bytes(group, &bytes[..*len as usize], 0),
            TagBuf::Other(_) => hash_bytes(group, self.text_of(tag).as_bytes(), 1),
        }
    }
}

/// No zone (an empty [`ZoneReads`]).
const NO_ZONE: u16 = u16::MAX;

/// Reads of one zone within a pass: the peak and the count decide the winner.
#[derive(Debug, Clone, Copy)]
struct ZoneReads {
    zone: u16,
    peak: i16,
    reader: u16,
    count: u32,
    /// First read, ms after the pass began.
    first: u32,
}

impl ZoneReads {
    const EMPTY: ZoneReads = ZoneReads {
        zone: NO_ZONE,
        peak: NONE,
        reader: 0,
        count: 0,
        first: 0,
    };

    fn new(zone: u16, rssi: i16, reader: u16, at: u32) -> Self {
        ZoneReads {
            zone,
            peak: rssi,
            reader,
            count: 1,
            first: at,
        }
    }

    fn is_empty(&self) -> bool {
        self.zone == NO_ZONE
    }

    fn add(&mut self, rssi: i16, reader: u16) {
        self.count += 1;
        if rssi > self.peak {
            self.peak = rssi;
            self.reader = reader;
        }
    }

    /// Stronger peak; on a tie more reads; then the earlier first read.
    fn beats(&self, other: &ZoneReads) -> bool {
        other.is_empty()
            || (!self.is_empty()
                && (self.peak, self.count, std::cmp::Reverse(self.first))
                    > (other.peak, other.count, std::cmp::Reverse(other.first)))
    }

    fn best(self, other: ZoneReads) -> ZoneReads {
        if other.beats(&self) {
            other
        } else {
            self
        }
    }
}

/// One open pass.
#[derive(Debug, Clone)]
struct Slot {
    tag: TagBuf,
    first_ms: i64,
    /// Last read, ms after `first_ms`.
    last: u32,
    /// Last read outside the challenger's zone, ms after `first_ms`.
    base_last: u32,
    count: u32,
    /// The zone holding the pass.
    hold: ZoneReads,
    /// The best of the zones that read the tag, challenged and faded (their reads stay here).
    merged: ZoneReads,
    /// A zone reading the tag meanwhile: its reads are kept apart until it takes the pass
    /// (they open the new pass) or another zone replaces it (they join `merged`).
    chal: ZoneReads,
    /// Mean RSSI of the holder and of the challenger, centi-dBm.
    hold_mean: i16,
    chal_mean: i16,
    chal_last: u32,
    /// Since when the challenger has been stronger by the margin (NIL: it is not).
    chal_since: u32,
    group: u16,
    rule: u16,
    kind: ReadKind,
    symbology: u8,
    /// `first` mode: already emitted.
    emitted: bool,
    /// The read time (ms after `first_ms`) of its LRU position: the last read is at most
    /// `RELINK_MS` later.
    linked: u32,
    /// LRU by `linked`: older toward `head`.
    prev: u32,
    next: u32,
}

/// How stale a pass's LRU position may be, ms: its window still ends exactly on time
/// ([`Suppressor::tick`]); a forced close takes the longest idle to within this.
const RELINK_MS: u32 = 250;

/// The suppressor: see the module docs.
pub struct Suppressor {
    s: Settings,
    slots: Vec<Slot>,
    free: Vec<u32>,
    table: HashTable<u32>,
    texts: Texts,
    head: u32,
    tail: u32,
    /// Shortest window of any rule: the LRU scan of [`Suppressor::tick`] stops there.
    min_window: i64,
    counters: Counters,
    track: Tracking,
}

impl ZoneReads {
    fn save(&self) -> SavedZone {
        SavedZone {
            zone: self.zone,
            peak: self.peak,
            reader: self.reader,
            count: self.count,
            first: self.first,
        }
    }

    fn load(z: &SavedZone) -> ZoneReads {
        ZoneReads {
            zone: z.zone,
            peak: z.peak,
            reader: z.reader,
            count: z.count,
            first: z.first,
        }
    }
}

impl<'a> Key<'a> {
    fn of(tag: &'a str) -> Key<'a> {
        match TagBuf::pack(tag) {
            Some((len, bytes)) => Key::Hex(len, bytes),
            None => Key::Other(tag),
        }
    }

    /// The table's hash of a pass key: the packed EPC bytes (or the text) seeded by the
    /// group, the same as [`Texts::hash`] of the stored tag.
    fn hash(&self, group: u16) -> u64 {
        match self {
            Key::Hex(len, bytes) => hash_bytes(group, &bytes[..*len as usize], 0),
            Key::Other(s) => hash_bytes(group, s.as_bytes(), 1),
        }
    }
}

fn hash_bytes(group: u16, b: &[u8], form: u64) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(b, (group as u64) << 1 | form)
}

fn ewma(mean: i16, x: i16) -> i16 {
    if x == NONE {
        return mean;
    }
    if mean == NONE {
        return x;
    }
    (mean as i32 + (x as i32 - mean as i32) / 4) as i16
}

impl Suppressor {
    /// A suppressor for `settings` (`max_tracked` slots are reserved up front and touched as
    /// used).
    pub fn new(settings: Settings) -> Self {
        let cap = settings.max_tracked.max(1);
        Suppressor {
            slots: Vec::with_capacity(cap),
            free: Vec::new(),
            table: HashTable::with_capacity(cap),
            texts: Texts::default(),
            head: NIL,
            tail: NIL,
            min_window: settings
                .rules
                .iter()
                .map(|r| r.window_ms as i64)
                .min()
                .unwrap_or(0),
            counters: Counters::default(),
            track: Tracking::default(),
            s: settings,
        }
    }

    /// Keep track of what changes, for [`Suppressor::take_changes`] (a bit and at most one
    /// list entry per changed pass between two takes).
    pub fn track_changes(&mut self) {
        self.track.on = true;
    }

    fn touched(&mut self, i: u32) {
        if self.track.on && self.track.dirty.set(i) {
            self.track.dirty_list.push(i);
        }
    }

    fn save(&self, i: u32) -> SavedPass {
        let s = &self.slots[i as usize];
        SavedPass {
            tag: self.texts.text(&s.tag),
            kind: s.kind,
            group: s.group,
            rule: s.rule,
            symbology: s.symbology,
            first_ms: s.first_ms,
            last: s.last,
            base_last: s.base_last,
            count: s.count,
            hold: s.hold.save(),
            merged: s.merged.save(),
            chal: s.chal.save(),
            hold_mean: s.hold_mean,
            chal_mean: s.chal_mean,
            chal_last: s.chal_last,
            chal_since: s.chal_since,
            emitted: s.emitted,
        }
    }

    /// What changed since the last call (see [`Changes`]); from now on those passes count as
    /// logged.
    pub fn take_changes(&mut self) -> Changes {
        let list = std::mem::take(&mut self.track.dirty_list);
        let mut open = Vec::with_capacity(list.len());
        for i in list {
            if self.track.dirty.get(i) {
                self.track.dirty.clear(i);
                self.track.logged.set(i);
                open.push(self.save(i));
            }
        }
        Changes {
            open,
            closed: std::mem::take(&mut self.track.closed),
        }
    }

    /// Every open pass, oldest read first; from now on all of them count as logged and
    /// nothing as changed.
    pub fn snapshot(&mut self) -> Vec<SavedPass> {
        let mut out = Vec::with_capacity(self.table.len());
        let mut i = self.head;
        while i != NIL {
            out.push(self.save(i));
            self.track.dirty.clear(i);
            self.track.logged.set(i);
            i = self.slots[i as usize].next;
        }
        // Dropped, not cleared: after a snapshot of a full table its capacity would stay (4
        // bytes per tracked pass).
        self.track.dirty_list = Vec::new();
        self.track.closed = Vec::new();
        out
    }

    /// Put a saved pass back (at start, passes saved in order of their last read). A pass of
    /// the same key already open is closed first (emitted into `out`). Counts as logged.
    pub fn restore(&mut self, p: &SavedPass, out: &mut Vec<Pass>) {
        let key = Key::of(&p.tag);
        let hash = key.hash(p.group);
        if let Some(i) = self.find(p.group, &key, hash) {
            self.close(i, End::Flushed, out);
        }
        let r = ReadIn {
            tag: &p.tag,
            kind: p.kind,
            group: p.group,
            zone: p.hold.zone,
            reader: p.hold.reader,
            rule: p.rule,
            rssi_dbm: None,
            symbology: p.symbology,
            at_ms: p.first_ms,
        };
        let i = self.open(&r, &key, NONE, hash, out);
        let s = &mut self.slots[i as usize];
        s.last = p.last;
        s.linked = p.last;
        s.base_last = p.base_last;
        s.count = p.count;
        s.hold = ZoneReads::load(&p.hold);
        s.merged = ZoneReads::load(&p.merged);
        s.chal = ZoneReads::load(&p.chal);
        s.hold_mean = p.hold_mean;
        s.chal_mean = p.chal_mean;
        s.chal_last = p.chal_last;
        s.chal_since = p.chal_since;
        s.emitted = p.emitted;
        if self.track.on {
            self.track.logged.set(i);
        }
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Open passes now.
    pub fn tracked(&self) -> usize {
        self.table.len()
    }

    /// Bytes of memory per tracked pass: a slot and its table entry (for the benchmark).
    pub const fn slot_bytes() -> usize {
        std::mem::size_of::<Slot>() + std::mem::size_of::<u32>() + 1
    }

    fn rule(&self, i: u16) -> Rule {
        self.s.rules.get(i as usize).copied().unwrap_or(Rule {
            mode: Mode::Aggregate,
            window_ms: 1000,
            offset_cdb: 0,
            floor_cdbm: None,
        })
    }

    fn unlink(&mut self, i: u32) {
        let (p, n) = (self.slots[i as usize].prev, self.slots[i as usize].next);
        match p {
            NIL => self.head = n,
            p => self.slots[p as usize].next = n,
        }
        match n {
            NIL => self.tail = p,
            n => self.slots[n as usize].prev = p,
        }
    }

    fn push_tail(&mut self, i: u32) {
        self.slots[i as usize].prev = self.tail;
        self.slots[i as usize].next = NIL;
        match self.tail {
            NIL => self.head = i,
            t => self.slots[t as usize].next = i,
        }
        self.tail = i;
    }

    fn find(&self, group: u16, key: &Key<'_>, hash: u64) -> Option<u32> {
        let (slots, texts) = (&self.slots, &self.texts);
        self.table
            .find(hash, |&i| {
                let s = &slots[i as usize];
                s.group == group && texts.is(&s.tag, key)
            })
            .copied()
    }

    /// The pass of slot `i` as emitted now: every read of it, at the strongest zone.
    fn pass_of(&self, i: u32, end: End) -> Pass {
        let s = &self.slots[i as usize];
        let win = s.hold.best(s.merged).best(s.chal);
        Pass {
            tag: self.texts.text(&s.tag),
            kind: s.kind,
            group: s.group,
            zone: win.zone,
            reader: win.reader,
            first_ms: s.first_ms,
            last_ms: s.first_ms + s.last as i64,
            read_count: s.count,
            peak_cdbm: (win.peak != NONE).then_some(win.peak),
            symbology: s.symbology,
            end,
        }
    }

    /// Close slot `i`: emit it (unless `first` mode already did) and free it.
    fn close(&mut self, i: u32, end: End, out: &mut Vec<Pass>) {
        if !self.slots[i as usize].emitted {
            out.push(self.pass_of(i, end));
            self.counters.passes += 1;
        }
        if self.track.on {
            self.track.dirty.clear(i);
            if self.track.logged.get(i) {
                self.track.logged.clear(i);
                let s = &self.slots[i as usize];
                let key = (s.group, self.texts.text(&s.tag));
                self.track.closed.push(key);
            }
        }
        let s = &self.slots[i as usize];
        let hash = self.texts.hash(s.group, &s.tag);
        if let Ok(e) = self.table.find_entry(hash, |&j| j == i) {
            e.remove();
        }
        let tag = self.slots[i as usize].tag.clone();
        self.texts.release(&tag);
        self.unlink(i);
        self.free.push(i);
    }

    /// Open a pass for `r` (whose RSSI is `rssi`, calibrated) and return its slot.
    fn open(
        &mut self,
        r: &ReadIn<'_>,
        key: &Key<'_>,
        rssi: i16,
        hash: u64,
        out: &mut Vec<Pass>,
    ) -> u32 {
        if self.table.len() >= self.s.max_tracked.max(1) && self.head != NIL {
            self.counters.forced += 1;
            self.close(self.head, End::Forced, out);
        }
        let slot = Slot {
            tag: self.texts.store(key),
            first_ms: r.at_ms,
            linked: 0,
            last: 0,
            base_last: 0,
            count: 1,
            hold: ZoneReads::new(r.zone, rssi, r.reader, 0),
            merged: ZoneReads::EMPTY,
            chal: ZoneReads::EMPTY,
            hold_mean: rssi,
            chal_mean: NONE,
            chal_last: 0,
            chal_since: NIL,
            group: r.group,
            rule: r.rule,
            kind: r.kind,
            symbology: r.symbology,
            emitted: false,
            prev: NIL,
            next: NIL,
        };
        let i = match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = slot;
                i
            }
            None => {
                self.slots.push(slot);
                (self.slots.len() - 1) as u32
            }
        };
        let (slots, texts) = (&self.slots, &self.texts);
        self.table.insert_unique(hash, i, |&j| {
            let s = &slots[j as usize];
            texts.hash(s.group, &s.tag)
        });
        self.push_tail(i);
        self.touched(i);
        i
    }

    /// Take one read. Passes that end because of it (moved, lasted too long, window run out,
    /// forced out of a full table, `first`/`off` emissions) are appended to `out`.
    pub fn read(&mut self, r: &ReadIn<'_>, out: &mut Vec<Pass>) {
        self.counters.reads_in += 1;
        let rule = self.rule(r.rule);
        let rssi = match r.rssi_dbm {
            Some(d) if d.is_finite() => {
                ((d * 100.0).round() as i64 + rule.offset_cdb as i64).clamp(-32767, 32767) as i16
            }
            _ => NONE,
        };
        if let Some(floor) = rule.floor_cdbm {
            if rssi != NONE && rssi < floor {
                self.counters.below_floor += 1;
                return;
            }
        }
        if rule.mode == Mode::Off {
            out.push(Pass {
                tag: r.tag.to_string(),
                kind: r.kind,
                group: r.group,
                zone: r.zone,
                reader: r.reader,
                first_ms: r.at_ms,
                last_ms: r.at_ms,
                read_count: 1,
                peak_cdbm: (rssi != NONE).then_some(rssi),
                symbology: r.symbology,
                end: End::Single,
            });
            self.counters.passes += 1;
            return;
        }
        let key = Key::of(r.tag);
        let hash = key.hash(r.group);
        let open = match self.find(r.group, &key, hash) {
            Some(i) => {
                let s = &self.slots[i as usize];
                let quiet = r.at_ms - (s.first_ms + s.last as i64);
                let window = self.rule(s.rule).window_ms as i64;
                if quiet >= window {
                    // Its window ran out before `tick` saw it.
                    self.close(i, End::Quiet, out);
                    None
                } else if r.at_ms - s.first_ms >= self.s.max_pass_ms as i64 {
                    self.close(i, End::MaxPass, out);
                    None
                } else {
                    Some(i)
                }
            }
            None => None,
        };
        let Some(i) = open else {
            let i = self.open(r, &key, rssi, hash, out);
            if rule.mode == Mode::First {
                out.push(self.pass_of(i, End::First));
                self.counters.passes += 1;
                self.slots[i as usize].emitted = true;
            }
            return;
        };
        self.counters.suppressed += 1;
        self.touched(i);
        // The LRU position is refreshed at most every `RELINK_MS` of a pass (relinking
        // touches two other slots: two cache misses per read in a large table).
        let s = &self.slots[i as usize];
        let at = (r.at_ms - s.first_ms).clamp(0, u32::MAX as i64 - 1) as u32;
        if at >= s.linked.saturating_add(RELINK_MS) {
            self.slots[i as usize].linked = at;
            self.unlink(i);
            self.push_tail(i);
        }
        if self.add(i, r, rssi) {
            self.move_pass(i, out);
            if rule.mode == Mode::First {
                out.push(self.pass_of(i, End::First));
                self.counters.passes += 1;
                self.slots[i as usize].emitted = true;
            }
        }
    }

    /// Add a read to open slot `i`; true when its zone takes the pass over.
    fn add(&mut self, i: u32, r: &ReadIn<'_>, rssi: i16) -> bool {
        let margin = self.s.zone_margin_cdb as i64;
        let dwell = self.s.zone_dwell_ms;
        let fade = self.s.fade_cdb_per_s as i64;
        let s = &mut self.slots[i as usize];
        // Reads arrive in time order per source; one a little older (another source) still
        // counts, at the pass's start.
        let at = (r.at_ms - s.first_ms).clamp(0, u32::MAX as i64 - 1) as u32;
        s.last = s.last.max(at);
        s.count = s.count.saturating_add(1);
        if r.zone == s.hold.zone {
            s.hold.add(rssi, r.reader);
            s.hold_mean = ewma(s.hold_mean, rssi);
            s.base_last = s.base_last.max(at);
            return false;
        }
        if r.zone == s.chal.zone {
            s.chal.add(rssi, r.reader);
            s.chal_mean = ewma(s.chal_mean, rssi);
            s.chal_last = s.chal_last.max(at);
        } else {
            // A new challenger: the old one (if any) fades into this pass.
            if !s.chal.is_empty() {
                s.merged = s.merged.best(s.chal);
                s.base_last = s.base_last.max(s.chal_last);
            }
            s.chal = ZoneReads::new(r.zone, rssi, r.reader, at);
            s.chal_mean = rssi;
            s.chal_last = at;
            s.chal_since = NIL;
        }
        if rssi == NONE || s.hold_mean == NONE || s.chal_mean == NONE {
            // Without RSSI a pass does not move; the peak rules pick the winner.
            return false;
        }
        // The holder's mean fades while it is not read.
        let idle_ms = (at as i64 - s.base_last as i64).max(0);
        let holder = s.hold_mean as i64 - fade * idle_ms / 1000;
        if s.chal_mean as i64 >= holder + margin {
            if s.chal_since == NIL {
                s.chal_since = at;
            }
            at.saturating_sub(s.chal_since) >= dwell
        } else {
            s.chal_since = NIL;
            false
        }
    }

    /// The challenger of slot `i` took the pass: emit the pass at the old zone (without the
    /// challenger's reads) and reopen the slot as the pass at the new zone, with them.
    fn move_pass(&mut self, i: u32, out: &mut Vec<Pass>) {
        self.counters.moves += 1;
        let s = &self.slots[i as usize];
        let c = s.chal;
        let win = s.hold.best(s.merged);
        let old = Pass {
            tag: self.texts.text(&s.tag),
            kind: s.kind,
            group: s.group,
            zone: win.zone,
            reader: win.reader,
            first_ms: s.first_ms,
            last_ms: s.first_ms + s.base_last as i64,
            read_count: s.count.saturating_sub(c.count),
            peak_cdbm: (win.peak != NONE).then_some(win.peak),
            symbology: s.symbology,
            end: End::Moved,
        };
        if !s.emitted {
            out.push(old);
            self.counters.passes += 1;
        }
        let s = &mut self.slots[i as usize];
        let shift = c.first;
        s.first_ms += shift as i64;
        s.last = s.chal_last.saturating_sub(shift);
        s.linked = s.last;
        s.base_last = s.last;
        s.count = c.count;
        s.hold = ZoneReads { first: 0, ..c };
        s.merged = ZoneReads::EMPTY;
        s.chal = ZoneReads::EMPTY;
        s.hold_mean = s.chal_mean;
        s.chal_mean = NONE;
        s.chal_last = 0;
        s.chal_since = NIL;
        s.emitted = false;
        // Its LRU position moves with it (the list stays ordered by link time).
        self.unlink(i);
        self.push_tail(i);
    }

    /// End the passes whose window ran out by `now_ms`, least recently read first.
    pub fn tick(&mut self, now_ms: i64, out: &mut Vec<Pass>) {
        let mut i = self.head;
        while i != NIL {
            let s = &self.slots[i as usize];
            let next = s.next;
            // Later passes were linked later and read no earlier than that: none of them has
            // been quiet for the shortest window.
            if now_ms - (s.first_ms + s.linked as i64) < self.min_window {
                break;
            }
            let quiet = now_ms - (s.first_ms + s.last as i64);
            if quiet >= self.rule(s.rule).window_ms as i64 {
                self.close(i, End::Quiet, out);
            }
            i = next;
        }
    }

    /// End every open pass (at shutdown).
    pub fn flush(&mut self, out: &mut Vec<Pass>) {
        while self.head != NIL {
            self.close(self.head, End::Flushed, out);
        }
    }
}

#[cfg(test)]
mod tests;
