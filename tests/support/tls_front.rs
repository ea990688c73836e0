//! A TLS front for the fake server: terminates TLS on 127.0.0.1 with a certificate from a
//! test CA (made with rcgen) and relays the plain bytes to a loopback HTTP server, one
//! thread per connection; counts successful and failed handshakes; stops on drop.

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::{ServerConfig, ServerConnection};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// How often the threads look at the stop flag while idle.
const TICK_MS: u16 = 50;

/// A private certificate authority.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().expect("a CA key");
        let cert = params.self_signed(&key).expect("the CA certificate");
        TestCa {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// The CA certificate in PEM, as a lab puts it in REQUESTS_CA_BUNDLE.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// A server certificate for `names` (DNS names or IP addresses), signed by this CA.
    pub fn leaf(&self, names: &[&str]) -> Leaf {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("leaf params");
        params
            .distinguished_name
            .push(DnType::CommonName, "testflinger test server");
        let key = KeyPair::generate().expect("a leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("the leaf");
        Leaf {
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        }
    }
}

/// A server certificate chain and its key.
pub struct Leaf {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

#[derive(Default)]
struct Counts {
    ok: AtomicUsize,
    failed: AtomicUsize,
    /// Why each failed handshake failed, as the server side saw it.
    failures: Mutex<Vec<String>>,
}

impl Counts {
    fn fail(&self, why: String) {
        self.failed.fetch_add(1, Ordering::SeqCst);
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(why);
    }
}

/// The running front; stops (and joins its threads) on drop.
pub struct TlsFront {
    port: u16,
    stop: Arc<AtomicBool>,
    counts: Arc<Counts>,
    acceptor: Option<JoinHandle<()>>,
}

impl TlsFront {
    /// Listens on 127.0.0.1:0 with `leaf` and relays to `backend_port` on 127.0.0.1.
    pub fn start(leaf: Leaf, backend_port: u16) -> TlsFront {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default versions")
            .with_no_client_auth()
            .with_single_cert(leaf.chain, leaf.key)
            .expect("the leaf and its key match");
        let config = Arc::new(config);
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the TLS front");
        let port = listener.local_addr().expect("bound address").port();
        let backend = SocketAddr::from(([127, 0, 0, 1], backend_port));
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(Counts::default());
        let acceptor = {
            let (stop, counts) = (Arc::clone(&stop), Arc::clone(&counts));
            std::thread::spawn(move || accept_loop(listener, backend, config, stop, counts))
        };
        TlsFront {
            port,
            stop,
            counts,
            acceptor: Some(acceptor),
        }
    }

    /// `https://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn handshakes_ok(&self) -> usize {
        self.counts.ok.load(Ordering::SeqCst)
    }

    pub fn handshakes_failed(&self) -> usize {
        self.counts.failed.load(Ordering::SeqCst)
    }

    /// Why the failed handshakes failed (server side), for assertion messages.
    pub fn failures(&self) -> Vec<String> {
        self.counts
            .failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

/// Whether `fd` has something to read (or hung up) within one tick.
fn readable(fds: &mut [PollFd<'_>]) -> io::Result<()> {
    match poll(fds, PollTimeout::from(TICK_MS)) {
        Ok(_) | Err(nix::errno::Errno::EINTR) => Ok(()),
        Err(e) => Err(io::Error::from(e)),
    }
}

fn is_ready(fd: &PollFd<'_>) -> bool {
    fd.revents()
        .is_some_and(|r| r.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR))
}

fn accept_loop(
    listener: TcpListener,
    backend: SocketAddr,
    config: Arc<ServerConfig>,
    stop: Arc<AtomicBool>,
    counts: Arc<Counts>,
) {
    let mut connections = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        if readable(&mut fds).is_err() {
            break;
        }
        if !is_ready(&fds[0]) {
            continue;
        }
        let Ok((client, _)) = listener.accept() else {
            continue;
        };
        let (config, stop, counts) = (Arc::clone(&config), Arc::clone(&stop), Arc::clone(&counts));
        connections.push(std::thread::spawn(move || {
            serve(client, backend, config, &stop, &counts)
        }));
        connections.retain(|c: &JoinHandle<()>| !c.is_finished());
    }
    for connection in connections {
        let _ = connection.join();
    }
}

/// One connection: the handshake, then bytes both ways until either side closes.
fn serve(
    mut client: TcpStream,
    backend: SocketAddr,
    config: Arc<ServerConfig>,
    stop: &AtomicBool,
    counts: &Counts,
) {
    let Ok(mut tls) = ServerConnection::new(config) else {
        counts.fail("cannot create the TLS session".to_string());
        return;
    };
    // The whole answer of the backend may be queued at once.
    tls.set_buffer_limit(None);
    let mut upstream: Option<TcpStream> = None;
    let mut buf = vec![0u8; 64 * 1024];
    let fail = |why: String, upstream: &Option<TcpStream>| {
        if upstream.is_none() {
            counts.fail(why);
        }
    };
    while !stop.load(Ordering::SeqCst) {
        while tls.wants_write() {
            if let Err(e) = tls.write_tls(&mut client) {
                return fail(format!("writing to the client: {e}"), &upstream);
            }
        }
        let (client_ready, upstream_ready) = {
            let mut fds = vec![PollFd::new(client.as_fd(), PollFlags::POLLIN)];
            if let Some(up) = &upstream {
                fds.push(PollFd::new(up.as_fd(), PollFlags::POLLIN));
            }
            if let Err(e) = readable(&mut fds) {
                return fail(format!("poll: {e}"), &upstream);
            }
            (is_ready(&fds[0]), fds.get(1).is_some_and(is_ready))
        };
        if client_ready {
            match tls.read_tls(&mut client) {
                Ok(0) => return fail("the client closed during the handshake".into(), &upstream),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return fail(format!("reading from the client: {e}"), &upstream),
            }
            let state = match tls.process_new_packets() {
                Ok(state) => state,
                Err(e) => {
                    // Send our alert, if any, then give up on the connection.
                    let _ = tls.write_tls(&mut client);
                    return fail(e.to_string(), &upstream);
                }
            };
            let peer_closed = state.peer_has_closed();
            if upstream.is_none() && !tls.is_handshaking() {
                counts.ok.fetch_add(1, Ordering::SeqCst);
                match TcpStream::connect(backend) {
                    Ok(up) => upstream = Some(up),
                    Err(_) => return,
                }
            }
            if let Some(up) = upstream.as_mut() {
                loop {
                    match tls.reader().read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            if up.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                        // No more plaintext for now.
                        Err(_) => break,
                    }
                }
            }
            if peer_closed {
                return;
            }
        }
        if upstream_ready {
            let Some(up) = upstream.as_mut() else {
                continue;
            };
            match up.read(&mut buf) {
                Ok(0) | Err(_) => {
                    tls.send_close_notify();
                    let _ = tls.write_tls(&mut client);
                    return;
                }
                Ok(n) => {
                    if tls.writer().write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
    }
}
