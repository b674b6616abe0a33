//! What a backend can do: [`Capabilities`].

/// What a backend can do, fixed when it is opened. The daemons size their batches and choose
/// their send strategy from it, so one event loop serves every backend.
///
/// It is a value rather than associated constants of [`PacketIo`](crate::PacketIo) because some
/// answers depend on the configuration and the kernel (a UDP socket's batch limit is configured;
/// AF_XDP's datagram limit follows the UMEM frame size and the link MTU), and because a trait with
/// constants could not be used as `dyn PacketIo`, which lets a daemon pick its backend at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// Short name of the backend, for logs: `"udp"` or `"af_xdp"`.
    pub backend: &'static str,
    /// Longest UDP payload the backend can send or receive, in bytes. What reaches another host
    /// unfragmented is further limited by the link MTU (payload = MTU - 28).
    pub max_datagram: usize,
    /// Most datagrams moved by one system call or ring operation. A batch may be larger; the
    /// backend then works through it in chunks of this size within one call.
    pub max_batch: usize,
    /// Generic segmentation offload on send: one descriptor carries many equal-size datagrams.
    pub gso: bool,
    /// Generic receive offload: the kernel may hand over several coalesced datagrams at once.
    pub gro: bool,
    /// Datagrams move between the NIC and the caller's memory without a copy by the CPU.
    pub zero_copy: bool,
    /// [`RxDatagram::destination`](crate::RxDatagram::destination) is the real destination of
    /// each datagram (so multicast and unicast arrivals can be told apart), not just the bound address.
    pub rx_destination: bool,
}

impl Capabilities {
    /// One line for logs and status files, e.g. `af_xdp, copy mode` or `udp, gso`: the backend
    /// and, for AF_XDP, whether the driver runs it in zero-copy or copy mode.
    pub fn summary(&self) -> String {
        let mut s = String::from(self.backend);
        if self.backend == "af_xdp" {
            s.push_str(if self.zero_copy { ", zero-copy" } else { ", copy mode" });
        }
        if self.gso {
            s.push_str(", gso");
        }
        if self.gro {
            s.push_str(", gro");
        }
        s
    }

    /// Capabilities of a backend named `backend` that moves datagrams of up to `max_datagram`
    /// bytes, `max_batch` at a time, with every optional feature off.
    pub const fn new(backend: &'static str, max_datagram: usize, max_batch: usize) -> Capabilities {
        Capabilities {
            backend,
            max_datagram,
            max_batch,
            gso: false,
            gro: false,
            zero_copy: false,
            rx_destination: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_name_the_backend_and_the_copy_mode() {
        let mut xdp = Capabilities::new("af_xdp", 1472, 64);
        assert_eq!(xdp.summary(), "af_xdp, copy mode");
        xdp.zero_copy = true;
        assert_eq!(xdp.summary(), "af_xdp, zero-copy");
        let mut udp = Capabilities::new("udp", 65507, 64);
        assert_eq!(udp.summary(), "udp");
        udp.gso = true;
        assert_eq!(udp.summary(), "udp, gso");
    }
}
