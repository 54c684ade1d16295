#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Foundation
import Logging
import NIOCore
import NIOPosix
import WeftProto

/// Serves a `HubAPI` implementation to agents over TCP and Unix sockets.
///
/// Guarantees: hub methods run on the `workerThreads` reading threads that read them, or on a
/// pool of `workerThreads` threads, never on an event loop (SPEC.md §4, Serving threads); a
/// connection has at most `maxInFlightRequestsPerConnection` requests running, and beyond that
/// the server stops reading from it; responses go back as soon as they are ready, tagged with
/// their request id; when a connection ends, every session opened through it is closed on the hub
/// (releasing that agent's open files); a malformed frame closes only its own connection, with a
/// log line. At most `maxConnections` connections are served at once; more are closed on accept.
/// With `idleTimeoutMs`, a connection that sends nothing for that long (agents ping every
/// `RemoteHub.heartbeatMs`) is closed, ending its sessions.
public final class HubServer: @unchecked Sendable {
    /// Default size of the worker pool; hub methods block on disk I/O and fsync.
    public static let defaultWorkerThreads = 16
    public static let defaultMaxInFlightRequestsPerConnection = 512
    public static let defaultMaxConnections = 1024
    /// Longest wait in `shutdown()` for running requests and session clean-up to finish.
    public static let shutdownDrainTimeoutMs = 30_000
    /// How long a response of stored blocks waits for a full socket before the rest is read
    /// into a buffer and queued (SPEC.md §4, Stored-block reads).
    public static let defaultSpanWaitMs = 100

    private let core: ServerCore
    private let reactor: HubReactor
    private let group: MultiThreadedEventLoopGroup
    private let logger: Logger
    private let maxConnections: Int
    private let spanWaitMaxNs: UInt64
    private let sendBufferBytes: Int?

    /// Stored-block bytes sent from their files with `sendfile`, read into buffers because the
    /// socket was full (SPEC.md §4, Stored-block reads), and sent from the hub's read cache.
    public var storedBlockBytes: (sentFromFile: Int, copied: Int, sentFromMemory: Int) {
        (core.spanBytesSent.load(ordering: .relaxed), core.spanBytesCopied.load(ordering: .relaxed),
         core.spanBytesFromMemory.load(ordering: .relaxed))
    }

    private let lock = PthreadMutex()
    /// Listening sockets and the threads that accept on them (SPEC.md §4, Direct sends).
    private var listeners: [Acceptor] = []
    private var connections: [ObjectIdentifier: HubConnection] = [:]
    private var unixSocketPaths: [String] = []
    private var localReads: LocalReadServer?
    private var isShutDown = false
    /// Connections admitted and not yet in `connections` (being set up).
    private var admitted = 0

    /// The newest connection number `client` fenced with (SPEC.md §4, Fences), for tests.
    func newestFencedConnection(ofClient client: UInt64) -> UInt64? {
        core.newestFencedConnection(ofClient: client)
    }

    public init(hub: HubAPI, logger: Logger,
                workerThreads: Int = HubServer.defaultWorkerThreads,
                eventLoopThreads: Int = min(System.coreCount, 4),
                maxInFlightRequestsPerConnection: Int = HubServer.defaultMaxInFlightRequestsPerConnection,
                maxConnections: Int = HubServer.defaultMaxConnections,
                idleTimeoutMs: Int? = nil, spanWaitMs: Int = HubServer.defaultSpanWaitMs,
                sendBufferBytes: Int? = nil) {
        precondition(workerThreads > 0 && eventLoopThreads > 0 && maxInFlightRequestsPerConnection > 0 && maxConnections > 0)
        precondition((idleTimeoutMs ?? 1) > 0)
        let pool = NIOThreadPool(numberOfThreads: workerThreads)
        pool.start()
        self.core = ServerCore(hub: hub, pool: pool, logger: logger,
                               maxInFlightRequestsPerConnection: maxInFlightRequestsPerConnection)
        self.reactor = HubReactor(threads: workerThreads, idleTimeoutMs: idleTimeoutMs, logger: logger)
        self.group = MultiThreadedEventLoopGroup(numberOfThreads: eventLoopThreads)
        self.logger = logger
        self.maxConnections = maxConnections
        self.spanWaitMaxNs = UInt64(max(0, spanWaitMs)) * 1_000_000
        self.sendBufferBytes = sendBufferBytes
    }

    /// Starts accepting TCP connections on `host:port`; port 0 picks a free port. Returns the bound port.
    @discardableResult
    public func listen(host: String, port: Int) throws -> Int {
        let bound = try startListening("\(host):\(port)") {
            try Sockets.listen(host: host, port: port, backlog: Self.backlog)
        }
        logger.info("hub listening", metadata: ["address": "\(host):\(bound.port)"])
        return bound.port
    }

    /// Starts accepting connections on a Unix socket at `unixSocketPath` (a stale socket file
    /// there is replaced). The file is removed by `shutdown()`.
    public func listen(unixSocketPath: String) throws {
        _ = try startListening(unixSocketPath) {
            (try Sockets.listen(unixPath: unixSocketPath, backlog: Self.backlog), 0)
        }
        lock.withLock { unixSocketPaths.append(unixSocketPath) }
        logger.info("hub listening", metadata: ["address": "unix:\(unixSocketPath)"])
    }

    /// Offers co-located agents to read the chunk store in `chunkDirectory` themselves (SPEC.md
    /// §4, Co-located reads): binds the socket and answers opcode 56 from now on. Only for a
    /// hub that holds every object it serves there (not a cluster hub). Returns the socket's name.
    @discardableResult
    public func offerLocalReads(chunkDirectory: String) throws -> String {
        let server = try LocalReadServer(chunkDirectory: chunkDirectory, logger: logger)
        let kept = lock.withLock { () -> Bool in
            guard !isShutDown, localReads == nil else { return false }
            localReads = server
            core.localReadsOffered.withLock { $0 = server }
            return true
        }
        guard kept else {
            server.stop()
            throw WeftError(EALREADY, "co-located reads are offered already, or the server is shut down")
        }
        logger.info("co-located reads offered", metadata: ["socket": "@\(server.name)"])
        return server.name
    }

    /// The co-located reads offered, if any.
    var localReadsOffer: LocalReadServer? { lock.withLock { localReads } }

    /// Descriptors of the chunk store handed to co-located agents so far.
    public var localReadHandshakes: Int { lock.withLock { localReads?.handshakeCount ?? 0 } }

    /// Number of agent connections currently open.
    public var connectionCount: Int { lock.withLock { connections.count } }

    /// Stops listening, closes every connection, waits (bounded) for running requests and for
    /// the departed agents' sessions to be closed, then stops the threads. Idempotent.
    public func shutdown() {
        let snapshot: ([Acceptor], [String])? = lock.withLock {
            if isShutDown { return nil }
            isShutDown = true
            return (listeners, unixSocketPaths)
        }
        guard let (listeners, paths) = snapshot else { return }
        lock.withLock { () -> LocalReadServer? in
            core.localReadsOffered.withLock { $0 = nil }
            return localReads
        }?.stop()
        for listener in listeners {
            // Ends the accept thread's accept (EINVAL), or its retries (the flag).
            listener.stop()
            Glibc.shutdown(listener.descriptor, Int32(SHUT_RDWR))
        }
        for listener in listeners {
            listener.waitUntilFinished()
            Glibc.close(listener.descriptor)
        }
        // Every accept thread has finished setting up what it accepted: all are here.
        let connections: [HubConnection] = lock.withLock {
            self.listeners.removeAll()
            return Array(self.connections.values)
        }
        for connection in connections {
            connection.end("hub shutting down")
            try? connection.channel.closeFuture.wait()
        }
        if !core.waitUntilIdle(timeoutMs: Self.shutdownDrainTimeoutMs) {
            logger.warning("hub shutdown: requests still running after \(Self.shutdownDrainTimeoutMs) ms")
        }
        reactor.stop()
        try? core.pool.syncShutdownGracefully()
        try? group.syncShutdownGracefully()
        for path in paths { unlink(path) }
        logger.info("hub server stopped")
    }

    deinit {
        if !isShutDown { logger.warning("HubServer released without shutdown(): its threads leak") }
    }

    static let backlog: Int32 = 256

    /// Opens a listening socket with `open` and starts its accept thread.
    private func startListening(_ address: String, _ open: () throws -> (Int32, Int)) throws -> (descriptor: Int32, port: Int) {
        try lock.withLock {
            if isShutDown { throw WeftError(ESHUTDOWN, "hub server is shut down") }
        }
        let (descriptor, port): (Int32, Int)
        do {
            (descriptor, port) = try open()
        } catch let error as WeftError {
            throw WeftError(error.errno, "cannot listen on \(address): \(error.message)")
        }
        let acceptor = Acceptor(descriptor: descriptor)
        try lock.withLock {
            guard !isShutDown else {
                Glibc.close(descriptor)
                throw WeftError(ESHUTDOWN, "hub server is shut down")
            }
            listeners.append(acceptor)
        }
        Thread.detachNewThread { [self] in
            acceptLoop(acceptor)
            acceptor.finished()
        }
        return (descriptor, port)
    }

    /// Accepts connections on `acceptor`'s socket until it is shut down (`shutdown()` closes it).
    private func acceptLoop(_ acceptor: Acceptor) {
        while let accepted = Sockets.accept(acceptor.descriptor, stopping: { acceptor.isStopping }) {
            switch accepted {
            case .success(let descriptor):
                serve(descriptor)
            case .failure(let error):
                logger.error("hub no longer accepts connections on this listener", metadata: ["error": "\(error)"])
                return
            }
        }
    }

    /// Makes a channel of an accepted socket (NIO writes what direct sends cannot, and closes
    /// it), with one duplicate for direct sends and one the reading threads read
    /// (SPEC.md §4, Direct sends and Serving threads).
    private func serve(_ descriptor: Int32) {
        guard admit() else {
            Glibc.close(descriptor)
            logger.warning("refusing agent connection", metadata: [
                "reason": "server is shutting down or has \(maxConnections) connections"])
            return
        }
        let sending = Sockets.duplicate(descriptor)
        let reading = sending >= 0 ? Sockets.duplicate(descriptor) : -1
        guard reading >= 0 else {
            let reason = String(cString: strerror(errno))
            if sending >= 0 { Glibc.close(sending) }
            Glibc.close(descriptor)
            lock.withLock { admitted -= 1 }
            logger.warning("refusing agent connection", metadata: ["reason": "dup: \(reason)"])
            return
        }
        let core = self.core
        let reactor = self.reactor
        final class Made: @unchecked Sendable {
            var connection: HubConnection?
            var registered = false
        }
        let made = Made()
        let peer = Sockets.peerName(descriptor)
        Sockets.setSendBuffer(descriptor, bytes: sendBufferBytes)
        // Output only: NIO must never read the socket, not even the rest of a stream at its end
        // (a socket channel does that whatever auto-read says), or it would take frames from
        // under the reading threads.
        let channel = NIOPipeBootstrap(group: group)
            .channelOption(ChannelOptions.allocator, value: BulkMemory.allocator)
            .channelInitializer { [self] channel in
                // First, so that both duplicates close with the channel whatever fails next.
                let sender = DirectSender(descriptor: sending, channel: channel, spanWaitMaxNs: self.spanWaitMaxNs)
                let connection = HubConnection(descriptor: reading, peer: peer, channel: channel, sender: sender,
                                               core: core, reactor: reactor)
                made.connection = connection
                // Counted as a connection before it can be served (`connectionCount`).
                self.lock.withLock {
                    self.admitted -= 1
                    self.connections[ObjectIdentifier(channel)] = connection
                }
                made.registered = true
                channel.closeFuture.whenComplete { [weak self] _ in
                    connection.channelClosedByNIO()
                    guard let self else { return }
                    self.lock.withLock { _ = self.connections.removeValue(forKey: ObjectIdentifier(channel)) }
                }
                do {
                    try channel.pipeline.syncOperations.addHandler(ConnectionWatch(connection: connection))
                    return channel.eventLoop.makeSucceededVoidFuture()
                } catch {
                    return channel.eventLoop.makeFailedFuture(error)
                }
            }
            .takingOwnershipOfDescriptor(output: descriptor)
        do {
            let channel = try channel.wait()
            if let connection = made.connection, !reactor.add(connection) {
                connection.end("server is shutting down")
            }
            if lock.withLock({ isShutDown }) { channel.close(promise: nil) }
        } catch {
            // A connection made closes its duplicates with the channel (or here), else they are
            // closed here. The socket itself is NIO's once the pipe channel exists (it closes it
            // on failure); a failure before that (none is known) would leave it open: a leak
            // rather than a close of a descriptor number that may already be reused.
            if let connection = made.connection {
                connection.end("set-up failed")
            } else {
                Glibc.close(sending)
                Glibc.close(reading)
            }
            if !made.registered { lock.withLock { admitted -= 1 } }
            logger.warning("could not set up agent connection", metadata: ["error": "\(error)"])
        }
    }

    /// Counts a new connection in, or refuses it when the server is at its bound or shutting down.
    private func admit() -> Bool {
        lock.withLock {
            guard !isShutDown, connections.count + admitted < maxConnections else { return false }
            admitted += 1
            return true
        }
    }
}

/// One listening socket, whether it is being shut down, and whether its accept thread has ended.
private final class Acceptor: @unchecked Sendable {
    let descriptor: Int32
    private let lock = PthreadMutex()
    private let ended = ConditionVariable()
    private var isFinished = false
    private var stopping = false

    var isStopping: Bool { lock.withLock { stopping } }

    func stop() { lock.withLock { stopping = true } }

    init(descriptor: Int32) {
        self.descriptor = descriptor
    }

    func finished() {
        lock.withLock {
            isFinished = true
            ended.broadcast()
        }
    }

    func waitUntilFinished() {
        lock.withLock {
            while !isFinished { _ = ended.wait(lock, deadlineNs: UInt64.max) }
        }
    }
}
