//! A minimal NBD client for tests that must observe each request's outcome (which writes were
//! acknowledged when a node died): fixed newstyle handshake, `NBD_OPT_GO`, simple replies,
//! one request at a time.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_FLUSH: u16 = 3;

/// A connected client.
#[derive(Debug)]
pub struct NbdClient {
    s: TcpStream,
    /// Export size.
    pub size: u64,
    cookie: u64,
}

/// Errors: the connection failed, or the server answered with an NBD error.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The connection.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// An NBD error value.
    #[error("server error {0}")]
    Server(u32),
    /// Something not NBD.
    #[error("protocol: {0}")]
    Protocol(String),
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap_or([0; 8]))
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap_or([0; 4]))
}

impl NbdClient {
    /// Connects and selects `export`.
    pub fn connect(addr: SocketAddr, export: &str, timeout: Duration) -> Result<Self, NbdError> {
        let mut s = TcpStream::connect_timeout(&addr, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_nodelay(true)?;
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello)?;
        if be64(&hello) != NBD_MAGIC || be64(&hello[8..]) != IHAVEOPT {
            return Err(NbdError::Protocol("not an NBD server".into()));
        }
        // Client flags: fixed newstyle, no zeroes.
        s.write_all(&3u32.to_be_bytes())?;
        let name = export.as_bytes();
        let mut opt = Vec::new();
        opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
        opt.extend_from_slice(&OPT_GO.to_be_bytes());
        opt.extend_from_slice(&((4 + name.len() + 2) as u32).to_be_bytes());
        opt.extend_from_slice(&(name.len() as u32).to_be_bytes());
        opt.extend_from_slice(name);
        opt.extend_from_slice(&0u16.to_be_bytes());
        s.write_all(&opt)?;
        let mut size = 0;
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h)?;
            if be64(&h) != OPT_REPLY_MAGIC {
                return Err(NbdError::Protocol("bad option reply".into()));
            }
            let typ = be32(&h[12..]);
            let len = be32(&h[16..]) as usize;
            let mut body = vec![0u8; len.min(1 << 16)];
            s.read_exact(&mut body)?;
            match typ {
                REP_ACK => break,
                REP_INFO if body.len() >= 12 && u16::from_be_bytes([body[0], body[1]]) == 0 => {
                    size = be64(&body[2..]);
                }
                REP_INFO => {}
                t if t & 0x8000_0000 != 0 => {
                    return Err(NbdError::Protocol(format!("export refused ({t:#x})")));
                }
                _ => {}
            }
        }
        Ok(Self { s, size, cookie: 0 })
    }

    fn request(
        &mut self,
        cmd: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> Result<Vec<u8>, NbdError> {
        self.cookie += 1;
        let mut r = Vec::with_capacity(28 + data.len());
        r.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        r.extend_from_slice(&0u16.to_be_bytes());
        r.extend_from_slice(&cmd.to_be_bytes());
        r.extend_from_slice(&self.cookie.to_be_bytes());
        r.extend_from_slice(&offset.to_be_bytes());
        r.extend_from_slice(&len.to_be_bytes());
        r.extend_from_slice(data);
        self.s.write_all(&r)?;
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h)?;
        if be32(&h) != SIMPLE_REPLY_MAGIC || be64(&h[8..]) != self.cookie {
            return Err(NbdError::Protocol("bad reply".into()));
        }
        let err = be32(&h[4..]);
        if err != 0 {
            return Err(NbdError::Server(err));
        }
        let mut out = vec![0u8; if cmd == CMD_READ { len as usize } else { 0 }];
        self.s.read_exact(&mut out)?;
        Ok(out)
    }

    /// Writes; `Ok` means acknowledged.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), NbdError> {
        self.request(CMD_WRITE, offset, data.len() as u32, data)
            .map(|_| ())
    }

    /// Reads.
    pub fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, NbdError> {
        self.request(CMD_READ, offset, len, &[])
    }

    /// Flushes.
    pub fn flush(&mut self) -> Result<(), NbdError> {
        self.request(CMD_FLUSH, 0, 0, &[]).map(|_| ())
    }
}
