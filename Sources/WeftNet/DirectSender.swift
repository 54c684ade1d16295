#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import NIOCore
import Synchronization

/// Writes frames on a connection's socket from the calling thread (SPEC.md §4, Direct sends).
///
/// Guarantees: `send` never blocks on the network; frames leave whole, in the order their
/// callers took the lock, never interleaved; bytes the socket does not take at once go to the
/// channel's write queue, and every later frame follows them there until that queue is empty;
/// after `close` (or a send error, which closes the channel) frames are dropped; the duplicate
/// descriptor is closed exactly once, never while a sender uses it.
final class DirectSender: @unchecked Sendable {
    private let lock = PthreadMutex()
    private let channel: Channel
    /// A duplicate of the channel's socket; -1 once closed. Guarded by `lock`.
    private var descriptor: Int32
    /// Bytes handed to the channel and not yet written by it: raised under `lock`, lowered by
    /// the event loop as the channel writes them (without the lock, so that no loop code ever
    /// waits for a sender). A sender that reads 0 knows every queued byte is on the socket.
    private let queuedBytes = Atomic<Int>(0)

    /// Takes ownership of `descriptor`, a duplicate of `channel`'s socket; closes it when the
    /// channel closes.
    init(descriptor: Int32, channel: Channel) {
        self.descriptor = descriptor
        self.channel = channel
        channel.closeFuture.whenComplete { [self] _ in close() }
    }

    /// Sends `frame`: directly if the channel has nothing queued, else (and for whatever the
    /// socket does not take now) through the channel.
    func send(_ frame: ByteBuffer) {
        var frame = frame
        var failure: Int32 = 0
        lock.withLock {
            guard descriptor >= 0 else { return }
            if queuedBytes.load(ordering: .acquiring) == 0 {
                while frame.readableBytes > 0 {
                    let sent = frame.withUnsafeReadableBytes { raw in
                        Glibc.send(descriptor, raw.baseAddress, raw.count, Int32(MSG_DONTWAIT | MSG_NOSIGNAL))
                    }
                    if sent >= 0 {
                        frame.moveReaderIndex(forwardBy: sent)
                        continue
                    }
                    let error = errno
                    if error == EINTR { continue }
                    if error != EAGAIN && error != EWOULDBLOCK { failure = error }
                    break
                }
                if frame.readableBytes == 0 || failure != 0 { return }
            }
            let count = frame.readableBytes
            queuedBytes.add(count, ordering: .releasing)
            // Always through the loop's task queue, also from the loop itself: frames queued by
            // other threads before this one are written first, and no NIO code runs under `lock`.
            let channel = self.channel
            let frameToQueue = frame
            channel.eventLoop.execute { [self] in
                let promise = channel.eventLoop.makePromise(of: Void.self)
                promise.futureResult.whenComplete { [self] _ in
                    queuedBytes.subtract(count, ordering: .releasing)
                }
                channel.writeAndFlush(frameToQueue, promise: promise)
            }
        }
        if failure != 0 {
            // Closing the channel ends the connection (the hub's reading threads, or the agent's
            // event loop, would see the error later); waiters fail at once.
            channel.close(promise: nil)
        }
    }

    /// Closes the duplicate descriptor; later frames are dropped. Idempotent.
    func close() {
        lock.withLock {
            guard descriptor >= 0 else { return }
            Glibc.close(descriptor)
            descriptor = -1
        }
    }
}
