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
}

/// One connection to the hub and what lives on it. Every field is guarded by `RemoteHub`'s lock;
/// `channel` and `sender` are set once, before the connection is published.
final class ClientConnection {
    var channel: Channel?
    /// Writes this connection's frames from the calling thread; set with `channel`.
    var sender: DirectSender?
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

    init(expectedInFlight: Int) {
        pending.reserveCapacity(expectedInFlight)
    }
}

/// Hands response frames and connection loss of one connection to its `RemoteHub`.
final class ClientResponseHandler: ChannelInboundHandler {
    typealias InboundIn = InboundFrame

    private let hub: RemoteHub
    private let connection: ClientConnection

    init(hub: RemoteHub, connection: ClientConnection) {
        self.hub = hub
        self.connection = connection
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = unwrapInboundIn(data)
        if !hub.deliver(frame, on: connection) {
            context.close(promise: nil)
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        hub.connectionLost(connection)
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        hub.logger.warning("closing hub connection after an error",
                           metadata: ["hub": "\(hub.address)", "error": "\(error)"])
        context.close(promise: nil)
    }
}
