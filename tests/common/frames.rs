//! Reader frames built the way the readers build them, for tests. Written from
//! REFERENCE-READERS.md independently of `src/protocol/` (the CRCs here are the vendors'
//! own bit-by-bit or nibble-by-nibble algorithms, not the `crc` crate the decoders use), so a
//! test that decodes these frames checks the decoders against a second implementation.
#![allow(dead_code)]

/// ThingMagic's CRC as MercuryAPI `serial_reader_l3.c` `tm_crc` computes it: init 0xFFFF,
/// the data fed into the register a nibble at a time through a 16-entry table (poly 0x1021).
pub fn tm_crc(bytes: &[u8]) -> u16 {
    const T: [u16; 16] = [
        0x0000, 0x1021, 0x2042, 0x3063, 0x4084, 0x50a5, 0x60c6, 0x70e7, 0x8108, 0x9129, 0xa14a,
        0xb16b, 0xc18c, 0xd1ad, 0xe1ce, 0xf1ef,
    ];
    let mut crc: u16 = 0xFFFF;
    for &b in bytes {
        crc = ((crc << 4) | (b >> 4) as u16) ^ T[(crc >> 12) as usize];
        crc = ((crc << 4) | (b & 0x0F) as u16) ^ T[(crc >> 12) as usize];
    }
    crc
}

/// CRC-16/MCRF4XX bit by bit (preset 0xFFFF, reflected poly 0x8408), as the Chafon manuals
/// give it in C.
pub fn chafon_crc(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0xFFFF;
    for &b in bytes {
        crc ^= b as u16;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x8408
            } else {
                crc >> 1
            };
        }
    }
    crc
}

/// An EM4100 ASCII frame for 5 id bytes: RDM6300 form, or ID-12LA form with `crlf`.
pub fn em4100(id: [u8; 5], crlf: bool) -> Vec<u8> {
    let x = id.iter().fold(0, |a, b| a ^ b);
    let mut f = vec![0x02];
    for b in id.iter().chain(std::iter::once(&x)) {
        f.extend_from_slice(format!("{b:02X}").as_bytes());
    }
    if crlf {
        f.extend_from_slice(b"\r\n");
    }
    f.push(0x03);
    f
}

/// A "BB" module tag notice: RSSI (dBm), PC 0x3000, the EPC, tag CRC.
pub fn uhf_bb_notice(rssi: i8, epc: &[u8]) -> Vec<u8> {
    let pl = epc.len() + 5;
    let mut f = vec![
        0xBB,
        0x02,
        0x22,
        (pl >> 8) as u8,
        pl as u8,
        rssi as u8,
        0x30,
        0x00,
    ];
    f.extend_from_slice(epc);
    f.extend_from_slice(&[0x5A, 0xA5]);
    let sum = f[1..].iter().fold(0u8, |a, &b| a.wrapping_add(b));
    f.extend_from_slice(&[sum, 0x7E]);
    f
}

/// A ThingMagic continuous-reading tag record with metadata count + RSSI + antenna
/// (flags 0x0007), antenna port `port` (TX = RX).
pub fn tm_streamed(rssi: i8, port: u8, epc: &[u8]) -> Vec<u8> {
    let mut data = vec![
        0x10,
        0x00,
        0x1B,
        0x00,
        0x07,
        0x01,
        0x01,
        rssi as u8,
        port << 4 | port,
    ];
    data.extend_from_slice(&(((epc.len() + 4) * 8) as u16).to_be_bytes());
    data.extend_from_slice(&[0x30, 0x00]);
    data.extend_from_slice(epc);
    data.extend_from_slice(&[0x12, 0x34]);
    tm_frame(0x22, 0x0000, &data)
}

/// A ThingMagic module → host frame.
pub fn tm_frame(op: u8, status: u16, data: &[u8]) -> Vec<u8> {
    let mut f = vec![0xFF, data.len() as u8, op];
    f.extend_from_slice(&status.to_be_bytes());
    f.extend_from_slice(data);
    let crc = tm_crc(&f[1..]);
    f.extend_from_slice(&crc.to_be_bytes());
    f
}

/// A Chafon frame: Len Adr Cmd Status Data CRC (LSB first).
pub fn chafon_frame(cmd: u8, status: u8, data: &[u8]) -> Vec<u8> {
    let mut f = vec![(data.len() + 5) as u8, 0x00, cmd, status];
    f.extend_from_slice(data);
    let crc = chafon_crc(&f);
    f.extend_from_slice(&crc.to_le_bytes());
    f
}

/// A Chafon real-time (288 family) read: antenna 1-4, EPC, raw RSSI.
pub fn chafon_realtime(antenna: u8, epc: &[u8], raw_rssi: u8) -> Vec<u8> {
    let mut data = vec![1u8 << (antenna - 1), epc.len() as u8];
    data.extend_from_slice(epc);
    data.push(raw_rssi);
    chafon_frame(0xEE, 0x00, &data)
}

/// A Chafon 288-family inventory answer with several EPCs from one antenna.
pub fn chafon_inventory(status: u8, antenna: u8, tags: &[(Vec<u8>, u8)]) -> Vec<u8> {
    let mut data = vec![1u8 << (antenna - 1), tags.len() as u8];
    for (epc, rssi) in tags {
        data.push(epc.len() as u8);
        data.extend_from_slice(epc);
        data.push(*rssi);
    }
    chafon_frame(0x01, status, &data)
}
