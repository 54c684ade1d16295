import Logging
import NIOCore
import NIOPosix
import WeftProto

/// A calling thread's slot for the response it waits for. Each thread owns one and reuses it for
/// every call, so a request allocates no waiter. `outcome` is guarded by `RemoteHub`'s lock.
final class ResponseWaiter {
    let wakeup = ConditionVariable()
    var outcome: Result<InboundFrame, WeftError>?
    /// Set by a call whose response is consumed on the event loop (a bulk read into caller
    /// memory): it runs there, under the lock, instead of handing the frame over, so the frame
    /// does not keep the receive buffer shared while the next frames arrive (NIO would copy it).
    var consume: ((InboundFrame) -> Void)?
    /// Set by a bulk call whose reply the connection's reading thread may receive straight into
    /// the caller's memory (SPEC.md §4, Agent reading thread).
    var sink: BulkSink?
    /// The reading thread is writing into the sink's memory right now. A caller that stops
    /// waiting (timeout, lost connection) waits for that write to end before it returns.
    var receiving = false
}

/// Where a bulk reply goes when the reading thread receives it straight into the caller's memory.
struct BulkSink {
    enum Shape {
        /// `i32` status, `u32` count, the bytes (readSlice, readSliceFrom).
        case bytes
        /// `i32` status, `u32` rawLength, `u32` n, n entries, `u32` byteCount, the bytes, `i32` trailer (readBlocks).
        case storedBlocks
    }

    let shape: Shape
    let opcode: HubOpcode
    let destination: UnsafeMutableRawBufferPointer
    /// Runs under the hub's lock with the payload bytes before the bulk and after it, once the
    /// bulk is in `destination`.
    let finish: (_ head: UnsafeRawBufferPointer, _ tail: UnsafeRawBufferPointer) -> Void
}

/// One connection to the hub and what lives on it. Every field is guarded by `RemoteHub`'s lock;
/// `channel` and `sender` are set once, before the connection is published.
final class ClientConnection {
    var channel: Channel?
    /// Writes this connection's frames from the calling thread; set with `channel`.
    var sender: DirectSender?
    /// Reads this connection on a thread of its own; set with `channel`.
    var reader: ClientReader?
    /// False from the moment the channel is known to be closed; then `pending` is empty.
    var isOpen = true
    /// Requests sent and not yet answered, by request id.
    var pending: [UInt64: ResponseWaiter] = [:]
    /// Session id the caller holds → id of the session opened for it on this connection.
    var liveSessions: [SessionID: SessionID] = [:]
    /// Send times of pings not yet answered (answers come in order).
    var pingsSentNs: [UInt64] = []
    /// Send time of the last ping the hub answered (at first, when the connection opened).
    var confirmedNs = MonotonicClock.nowNs()
    /// This end of the socket as `Sockets.localName` gives it; set before the connection is published.
    var localEndpoint = ""

    init(expectedInFlight: Int) {
        pending.reserveCapacity(expectedInFlight)
    }
}
