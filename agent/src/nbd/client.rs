//! A minimal NBD client (fixed newstyle, NBD_OPT_GO, simple replies): enough for the
//! quickstart to write through an export with nothing else installed.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};

use super::wire::*;

pub struct Client {
    conn: TcpStream,
    pub size: u64,
    handle: u64,
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

impl Client {
    pub fn connect(addr: SocketAddr, export: &str) -> io::Result<Client> {
        let mut c = TcpStream::connect(addr)?;
        c.set_nodelay(true)?;
        let mut greet = [0u8; 18];
        c.read_exact(&mut greet)?;
        if u64::from_be_bytes(greet[0..8].try_into().expect("8")) != NBDMAGIC
            || u64::from_be_bytes(greet[8..16].try_into().expect("8")) != IHAVEOPT
        {
            return Err(bad("not an NBD server (fixed newstyle)"));
        }
        c.write_all(&(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes())?;
        let mut data = (export.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        let mut m = IHAVEOPT.to_be_bytes().to_vec();
        m.extend_from_slice(&OPT_GO.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(&data);
        c.write_all(&m)?;
        let mut size = None;
        loop {
            let mut h = [0u8; 20];
            c.read_exact(&mut h)?;
            let kind = u32::from_be_bytes(h[12..16].try_into().expect("4"));
            let len = u32::from_be_bytes(h[16..20].try_into().expect("4")) as usize;
            let mut d = vec![0u8; len];
            c.read_exact(&mut d)?;
            match kind {
                REP_ACK => break,
                REP_INFO if d.len() >= 12 && u16::from_be_bytes([d[0], d[1]]) == INFO_EXPORT => {
                    size = Some(u64::from_be_bytes(d[2..10].try_into().expect("8")));
                }
                REP_INFO => {}
                k => {
                    return Err(bad(format!(
                        "export {export:?} refused ({k:#x}): {}",
                        String::from_utf8_lossy(&d)
                    )))
                }
            }
        }
        Ok(Client {
            conn: c,
            size: size.ok_or_else(|| bad("no export size in the reply"))?,
            handle: 0,
        })
    }

    fn request(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> io::Result<()> {
        self.handle += 1;
        let header = Request {
            flags,
            kind,
            handle: self.handle,
            offset,
            length: len,
        };
        let mut r = Vec::with_capacity(28 + data.len());
        r.extend_from_slice(&header.encode());
        r.extend_from_slice(data);
        self.conn.write_all(&r)?;
        let mut rep = [0u8; 16];
        self.conn.read_exact(&mut rep)?;
        let err = u32::from_be_bytes(rep[4..8].try_into().expect("4"));
        if err != 0 {
            return Err(io::Error::from_raw_os_error(err as i32));
        }
        Ok(())
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.request(CMD_WRITE, 0, offset, data.len() as u32, data)
    }

    pub fn zero(&mut self, offset: u64, len: u32) -> io::Result<()> {
        self.request(CMD_WRITE_ZEROES, 0, offset, len, &[])
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.request(CMD_FLUSH, 0, 0, 0, &[])
    }

    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.request(CMD_READ, 0, offset, buf.len() as u32, &[])?;
        self.conn.read_exact(buf)
    }

    /// Reads `len` bytes at each of `offsets` with up to `depth` requests in flight,
    /// as QEMU and the kernel's client keep them; `each` gets every range's offset
    /// and bytes in the order the replies come (a server may answer out of order).
    pub fn read_pipelined(
        &mut self,
        offsets: &[u64],
        len: u32,
        depth: usize,
        mut each: impl FnMut(u64, &[u8]),
    ) -> io::Result<()> {
        let depth = depth.max(1);
        let mut sent = 0usize;
        let mut pending = std::collections::HashMap::new();
        let mut buf = vec![0u8; len as usize];
        let mut done = 0usize;
        while done < offsets.len() {
            while sent < offsets.len() && pending.len() < depth {
                self.handle += 1;
                let r = Request {
                    flags: 0,
                    kind: CMD_READ,
                    handle: self.handle,
                    offset: offsets[sent],
                    length: len,
                };
                self.conn.write_all(&r.encode())?;
                pending.insert(self.handle, offsets[sent]);
                sent += 1;
            }
            let mut rep = [0u8; 16];
            self.conn.read_exact(&mut rep)?;
            let err = u32::from_be_bytes(rep[4..8].try_into().expect("4"));
            let handle = u64::from_be_bytes(rep[8..16].try_into().expect("8"));
            let offset = pending
                .remove(&handle)
                .ok_or_else(|| bad(format!("a reply to handle {handle}, never sent")))?;
            if err != 0 {
                return Err(io::Error::from_raw_os_error(err as i32));
            }
            self.conn.read_exact(&mut buf)?;
            each(offset, &buf);
            done += 1;
        }
        Ok(())
    }

    pub fn disconnect(mut self) -> io::Result<()> {
        self.handle += 1;
        let r = Request {
            flags: 0,
            kind: CMD_DISC,
            handle: self.handle,
            offset: 0,
            length: 0,
        };
        self.conn.write_all(&r.encode())
    }
}
