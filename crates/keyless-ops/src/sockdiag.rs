//! `NETLINK_SOCK_DIAG`: one TCP socket by its exact 4-tuple (`inet_diag`, the kernel's
//! `inet_diag_find_one_icsk`: a hash lookup, one round trip), never a dump of the table.
//!
//! Used by the listeners to tell which local UID owns a peer socket ([`SockDiag::uid_of`],
//! `limits`), and by the node's caller attestation to find a pod's socket, its state, inode
//! and creator's cgroup ([`SockDiag::query`]).
//!
//! A netlink socket answers for the network namespace of the thread that created it: a
//! [`SockDiag::open`] made after `setns(2)` into another namespace looks there, whatever
//! namespace the thread is in when it queries.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const INET_DIAG_NOCOOKIE: u32 = !0;
/// `INET_DIAG_CGROUP_ID` (Linux 5.7+): the cgroup v2 id of the socket's creator. The kernel
/// adds it to every reply (no extension to ask for).
const INET_DIAG_CGROUP_ID: u16 = 21;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct NlMsgHdr {
    len: u32,
    ty: u16,
    flags: u16,
    seq: u32,
    pid: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct SockId {
    sport: u16,
    dport: u16,
    src: [u32; 4],
    dst: [u32; 4],
    ifindex: u32,
    cookie: [u32; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct ReqV2 {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: SockId,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct DiagMsg {
    family: u8,
    state: u8,
    timer: u8,
    retrans: u8,
    id: SockId,
    expires: u32,
    rqueue: u32,
    wqueue: u32,
    uid: u32,
    inode: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Msg {
    hdr: NlMsgHdr,
    req: ReqV2,
}

const HDR: usize = std::mem::size_of::<NlMsgHdr>();

/// TCP states (`include/net/tcp_states.h`) in which the queried socket — the peer's end —
/// is still a live process's socket: established, or half closed. A peer that shuts down
/// its sending side after its request is in `FIN_WAIT1` / `FIN_WAIT2` with its descriptor
/// still open; `CLOSE_WAIT` (our side closed first) cannot happen before we answer but is
/// as owned. Other states are refused: `TIME_WAIT` is a mini-socket the kernel reports with
/// UID 0 and inode 0 (a user closing right after sending would pass for root), `CLOSE`,
/// `LAST_ACK`, `CLOSING` belong to no process any more.
const OWNED_STATES: [u8; 4] = [
    1, // ESTABLISHED
    4, // FIN_WAIT1
    5, // FIN_WAIT2
    8, // CLOSE_WAIT
];

/// What the kernel says of one socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Diag {
    /// TCP state (`include/net/tcp_states.h`)
    pub state: u8,
    pub uid: u32,
    /// 0: no descriptor holds it (orphaned, `TIME_WAIT`)
    pub inode: u32,
    /// the cgroup v2 id of the cgroup its creator was in (`INET_DIAG_CGROUP_ID`; `None` before
    /// Linux 5.7)
    pub cgroup_id: Option<u64>,
}

impl Diag {
    /// Whether a live process still holds the socket: a state of [`OWNED_STATES`] and a
    /// descriptor (inode ≠ 0; an orphaned socket — closed by its process — has inode 0).
    pub fn is_held(&self) -> bool {
        OWNED_STATES.contains(&self.state) && self.inode != 0
    }

    /// The owner the socket names: its UID when [`Self::is_held`], else none.
    pub fn owner(&self) -> Option<u32> {
        self.is_held().then_some(self.uid)
    }
}

/// What the datagram `bytes` says about query `seq`: `None` nothing (replies to earlier,
/// timed-out queries are skipped), `Some(None)` no such socket, `Some(Some(diag))`.
fn parse_reply(bytes: &[u8], seq: u32) -> Option<Option<Diag>> {
    let mut off = 0usize;
    while off + HDR <= bytes.len() {
        // SAFETY: HDR bytes are in bounds (checked above); read_unaligned copies them out
        let h: NlMsgHdr =
            unsafe { std::ptr::read_unaligned(bytes[off..].as_ptr().cast::<NlMsgHdr>()) };
        let len = h.len as usize;
        if len < HDR || off + len > bytes.len() {
            break;
        }
        if h.seq == seq {
            match h.ty {
                SOCK_DIAG_BY_FAMILY if len >= HDR + std::mem::size_of::<DiagMsg>() => {
                    // SAFETY: the message (checked to be within `bytes`) holds a DiagMsg
                    let m: DiagMsg = unsafe {
                        std::ptr::read_unaligned(bytes[off + HDR..].as_ptr().cast::<DiagMsg>())
                    };
                    let attrs_at = off + HDR + std::mem::size_of::<DiagMsg>();
                    return Some(Some(Diag {
                        state: m.state,
                        uid: m.uid,
                        inode: m.inode,
                        cgroup_id: cgroup_attr(&bytes[attrs_at..off + len]),
                    }));
                }
                NLMSG_ERROR | NLMSG_DONE => return Some(None),
                _ => {}
            }
        }
        off += (len + 3) & !3;
    }
    None
}

/// The `INET_DIAG_CGROUP_ID` attribute among `attrs` (netlink attributes: u16 length,
/// u16 type, the value, padded to 4 bytes).
fn cgroup_attr(attrs: &[u8]) -> Option<u64> {
    let mut off = 0usize;
    while off + 4 <= attrs.len() {
        let len = u16::from_ne_bytes([attrs[off], attrs[off + 1]]) as usize;
        let ty = u16::from_ne_bytes([attrs[off + 2], attrs[off + 3]]) & 0x3fff;
        if len < 4 || off + len > attrs.len() {
            return None;
        }
        if ty == INET_DIAG_CGROUP_ID && len >= 12 {
            let v: [u8; 8] = attrs[off + 4..off + 12].try_into().ok()?;
            return Some(u64::from_ne_bytes(v));
        }
        off += (len + 3) & !3;
    }
    None
}

fn words(ip: IpAddr) -> [u32; 4] {
    let mut w = [0u32; 4];
    match ip {
        IpAddr::V4(a) => w[0] = u32::from_ne_bytes(a.octets()),
        IpAddr::V6(a) => {
            for (i, c) in a.octets().chunks_exact(4).enumerate() {
                w[i] = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
    }
    w
}

/// A `NETLINK_SOCK_DIAG` socket (of the network namespace its [`Self::open`] ran in).
pub struct SockDiag {
    fd: OwnedFd,
    seq: u32,
}

impl SockDiag {
    /// A socket in the calling thread's network namespace; a reply is waited for 200 ms at
    /// most.
    pub fn open() -> io::Result<Self> {
        // SAFETY: plain socket/setsockopt calls; the fd is owned right after creation.
        unsafe {
            let fd = libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                libc::NETLINK_SOCK_DIAG,
            );
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let fd = OwnedFd::from_raw_fd(fd);
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 200_000,
            };
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            );
            Ok(SockDiag { fd, seq: 0 })
        }
    }

    /// The TCP socket whose local end is `src` and remote end `dst`, in any state, asked as
    /// the addresses' family (IPv4-mapped IPv6 addresses are asked as IPv6: canonicalize
    /// first to ask as IPv4). `Ok(None)`: no such socket, or not of one family; `Err` when the
    /// netlink socket itself failed.
    pub fn query(&mut self, src: SocketAddr, dst: SocketAddr) -> io::Result<Option<Diag>> {
        let family = match (src, dst) {
            (SocketAddr::V4(_), SocketAddr::V4(_)) => libc::AF_INET,
            (SocketAddr::V6(_), SocketAddr::V6(_)) => libc::AF_INET6,
            _ => return Ok(None),
        };
        self.seq = self.seq.wrapping_add(1);
        let msg = Msg {
            hdr: NlMsgHdr {
                len: std::mem::size_of::<Msg>() as u32,
                ty: SOCK_DIAG_BY_FAMILY,
                flags: NLM_F_REQUEST,
                seq: self.seq,
                pid: 0,
            },
            req: ReqV2 {
                family: family as u8,
                protocol: libc::IPPROTO_TCP as u8,
                ext: 0,
                pad: 0,
                states: !0,
                id: SockId {
                    sport: src.port().to_be(),
                    dport: dst.port().to_be(),
                    src: words(src.ip()),
                    dst: words(dst.ip()),
                    ifindex: 0,
                    cookie: [INET_DIAG_NOCOOKIE; 2],
                },
            },
        };
        // SAFETY: `msg` is a plain repr(C) value sent as bytes; the receive buffer is an
        // aligned u64 array and every header / message read is bounds-checked first and
        // copied out with read_unaligned.
        unsafe {
            let n = libc::send(
                self.fd.as_raw_fd(),
                (&msg as *const Msg).cast(),
                std::mem::size_of::<Msg>(),
                0,
            );
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut buf = [0u64; 1024];
            // replies to earlier (timed-out) queries are skipped by sequence number
            for _ in 0..8 {
                let n = libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    std::mem::size_of_val(&buf),
                    0,
                );
                if n < 0 {
                    return Err(io::Error::last_os_error());
                }
                let bytes = std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), n as usize);
                if let Some(answer) = parse_reply(bytes, self.seq) {
                    return Ok(answer);
                }
            }
        }
        Ok(None)
    }

    /// The UID owning the TCP socket whose local end is `src` and remote end `dst`
    /// (IPv4-mapped addresses asked as IPv4), only while a process holds it
    /// ([`Diag::owner`]). `Ok(None)`: no such socket, no owner to tell, or not of one family;
    /// `Err` when the netlink socket itself failed.
    pub fn uid_of(&mut self, src: SocketAddr, dst: SocketAddr) -> io::Result<Option<u32>> {
        let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
        Ok(self
            .query(canonical(src), canonical(dst))?
            .and_then(|d| d.owner()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A crafted `SOCK_DIAG_BY_FAMILY` reply datagram, with netlink attributes `attrs`.
    fn reply_with(seq: u32, state: u8, uid: u32, inode: u32, attrs: &[u8]) -> Vec<u8> {
        let m = DiagMsg {
            family: libc::AF_INET as u8,
            state,
            uid,
            inode,
            ..Default::default()
        };
        let h = NlMsgHdr {
            len: (HDR + std::mem::size_of::<DiagMsg>() + attrs.len()) as u32,
            ty: SOCK_DIAG_BY_FAMILY,
            seq,
            ..Default::default()
        };
        let mut out = vec![];
        // SAFETY: plain repr(C) values viewed as their bytes
        unsafe {
            out.extend_from_slice(std::slice::from_raw_parts(
                (&h as *const NlMsgHdr).cast::<u8>(),
                HDR,
            ));
            out.extend_from_slice(std::slice::from_raw_parts(
                (&m as *const DiagMsg).cast::<u8>(),
                std::mem::size_of::<DiagMsg>(),
            ));
        }
        out.extend_from_slice(attrs);
        out
    }

    fn reply(seq: u32, state: u8, uid: u32, inode: u32) -> Vec<u8> {
        reply_with(seq, state, uid, inode, &[])
    }

    /// A netlink attribute: u16 length, u16 type, the value (padded to 4 bytes).
    fn attr(ty: u16, value: &[u8]) -> Vec<u8> {
        let mut a = ((4 + value.len()) as u16).to_ne_bytes().to_vec();
        a.extend(ty.to_ne_bytes());
        a.extend(value);
        a.resize((a.len() + 3) & !3, 0);
        a
    }

    /// What `uid_of` makes of a reply.
    fn owner(bytes: &[u8], seq: u32) -> Option<Option<u32>> {
        parse_reply(bytes, seq).map(|d| d.and_then(|d| d.owner()))
    }

    #[test]
    fn only_a_live_owned_socket_names_its_owner() {
        // ESTABLISHED with a descriptor: its UID
        assert_eq!(owner(&reply(7, 1, 1000, 4242), 7), Some(Some(1000)));
        // half closed by the peer, descriptor still open: still its UID
        assert_eq!(owner(&reply(7, 4, 1000, 4242), 7), Some(Some(1000)));
        assert_eq!(owner(&reply(7, 5, 1000, 4242), 7), Some(Some(1000)));
        assert_eq!(owner(&reply(7, 8, 1000, 4242), 7), Some(Some(1000)));
        // TIME_WAIT as the kernel reports it (UID 0, inode 0): not root, unknown
        assert_eq!(owner(&reply(7, 6, 0, 0), 7), Some(None));
        // an orphaned socket (its process closed it): unknown
        assert_eq!(owner(&reply(7, 4, 1000, 0), 7), Some(None));
        assert_eq!(owner(&reply(7, 1, 1000, 0), 7), Some(None));
        // CLOSE, LAST_ACK, CLOSING, even with an inode: unknown
        for state in [7, 9, 11] {
            assert_eq!(owner(&reply(7, state, 1000, 4242), 7), Some(None));
        }
        // another query's reply is skipped; a truncated one is ignored
        assert_eq!(owner(&reply(6, 1, 1000, 4242), 7), None);
        let r = reply(7, 1, 1000, 4242);
        assert_eq!(owner(&r[..r.len() - 1], 7), None);
        // several messages in one datagram: the one of this query answers
        let mut two = reply(6, 1, 1, 1);
        two.extend(reply(7, 1, 1000, 4242));
        assert_eq!(owner(&two, 7), Some(Some(1000)));
    }

    #[test]
    fn sock_diag_replies_are_read_by_sequence() {
        assert_eq!(parse_reply(&[], 1), None);
        assert_eq!(parse_reply(&[1, 2, 3], 1), None, "short");
        // an NLMSG_ERROR (ENOENT) for seq 7: no such socket
        let mut err = vec![0u8; 36];
        err[0..4].copy_from_slice(&36u32.to_ne_bytes());
        err[4..6].copy_from_slice(&2u16.to_ne_bytes());
        err[8..12].copy_from_slice(&7u32.to_ne_bytes());
        assert_eq!(parse_reply(&err, 7), Some(None));
        assert_eq!(parse_reply(&err, 8), None, "another query's");
    }

    #[test]
    fn the_creators_cgroup_is_read_from_the_attributes() {
        let id = 0x1234_5678_9abc_u64.to_ne_bytes();
        // among other attributes (INET_DIAG_SHUTDOWN, a u8 padded to 4 bytes)
        let mut attrs = attr(8, &[0]);
        attrs.extend(attr(INET_DIAG_CGROUP_ID, &id));
        let d = parse_reply(&reply_with(3, 1, 1000, 4242, &attrs), 3);
        assert_eq!(
            d,
            Some(Some(Diag {
                state: 1,
                uid: 1000,
                inode: 4242,
                cgroup_id: Some(0x1234_5678_9abc),
            }))
        );
        // none (a kernel before 5.7), or a truncated attribute: unknown
        let d = parse_reply(&reply(3, 1, 1000, 4242), 3).unwrap().unwrap();
        assert_eq!(d.cgroup_id, None);
        let cut = attr(INET_DIAG_CGROUP_ID, &id[..4]);
        let d = parse_reply(&reply_with(3, 1, 1000, 4242, &cut), 3);
        assert_eq!(d.unwrap().unwrap().cgroup_id, None);
    }

    #[test]
    fn sock_diag_finds_the_owner_of_a_local_socket() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (_s, peer) = l.accept().unwrap();
        let mut d = SockDiag::open().unwrap();
        // SAFETY: getuid has no preconditions
        let me = unsafe { libc::getuid() };
        assert_eq!(d.uid_of(peer, l.local_addr().unwrap()).unwrap(), Some(me));
        assert_eq!(c.local_addr().unwrap(), peer);
        // a tuple nobody holds
        let gone = SocketAddr::new(peer.ip(), 1);
        assert_eq!(d.uid_of(gone, l.local_addr().unwrap()).unwrap(), None);
        // the whole row: established, held, made in this process' cgroup (cgroup v2 id: the
        // inode of its directory, where cgroup v2 is mounted)
        let row = d.query(peer, l.local_addr().unwrap()).unwrap().unwrap();
        assert_eq!((row.state, row.uid), (1, me));
        assert!(row.is_held() && row.inode != 0, "{row:?}");
        let v2 = std::fs::read_to_string("/proc/self/cgroup")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("0::").map(String::from))
            });
        let mount = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
            .into_iter()
            .find(|m| std::path::Path::new(m).join("cgroup.controllers").exists());
        if let (Some(id), Some(path), Some(mount)) = (row.cgroup_id, v2, mount) {
            let dir = std::path::Path::new(mount).join(path.trim_start_matches('/'));
            if let Ok(m) = std::fs::metadata(&dir) {
                assert_eq!(id, std::os::unix::fs::MetadataExt::ino(&m), "{dir:?}");
            }
        }
        // mixed families: nothing to ask
        let v6: SocketAddr = "[::1]:80".parse().unwrap();
        assert_eq!(d.query(peer, v6).unwrap(), None);
    }
}
