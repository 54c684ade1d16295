#if canImport(Glibc)
import Glibc
#endif
import CWeftSupport
import Foundation
import Logging
import Synchronization
import WeftChunks
import WeftProto

/// The hub's side of co-located reads (SPEC.md §4, Co-located reads): an abstract Unix socket
/// with a random name that hands the chunk store's directory descriptor to a peer running as
/// root or as this process's user. One thread accepts and answers each handshake in turn (one
/// per agent connection, a few bytes each); a peer that sends nothing is dropped after
/// `handshakeTimeoutMs`.
public final class LocalReadServer: @unchecked Sendable {
    public static let namePrefix = "weft-local-reads-"
    static let request = Array("WEFTLR01".utf8)
    static let replyMagic = Array("WEFTLR".utf8)
    static let replyBytes = 8
    static let handshakeTimeoutMs = 2_000

    /// The socket's abstract name (without the leading NUL).
    public let name: String
    private let directory: String
    private let logger: Logger
    private let listener: Int32
    private let stopping = Atomic<Bool>(false)
    private let finished = DispatchSemaphore(value: 0)
    private let handshakes = Atomic<Int>(0)

    /// Descriptors handed out so far.
    public var handshakeCount: Int { handshakes.load(ordering: .relaxed) }

    /// Binds the socket and starts answering; `directory` is the chunk store's.
    public init(chunkDirectory directory: String, logger: Logger) throws {
        var random = SystemRandomNumberGenerator()
        let suffix = (0..<16).map { _ in String(format: "%02x", UInt8.random(in: 0...255, using: &random)) }.joined()
        name = Self.namePrefix + suffix
        self.directory = directory
        self.logger = logger
        listener = weft_listen_abstract(name, 64)
        guard listener >= 0 else {
            throw WeftError(errno, "cannot bind the co-located reads socket: \(String(cString: strerror(errno)))")
        }
        Thread.detachNewThread { [self] in
            acceptLoop()
            finished.signal()
        }
    }

    /// Stops answering and closes the socket. Call once.
    public func stop() {
        stopping.store(true, ordering: .relaxed)
        shutdown(listener, Int32(SHUT_RDWR))
        finished.wait()
        close(listener)
    }

    private func acceptLoop() {
        while let accepted = Sockets.accept(listener, stopping: { stopping.load(ordering: .relaxed) }) {
            switch accepted {
            case .success(let peer):
                answer(peer)
                close(peer)
            case .failure(let error):
                logger.error("co-located reads: no longer accepting", metadata: ["error": "\(error)"])
                return
            }
        }
    }

    /// Reads the request, checks the peer's user and replies, with the store's descriptor when
    /// all is well.
    private func answer(_ peer: Int32) {
        Sockets.setReceiveTimeout(peer, ms: Self.handshakeTimeoutMs)
        var received = [UInt8](repeating: 0, count: Self.request.count)
        let got = received.withUnsafeMutableBytes { Sockets.receiveFully(peer, $0) }
        guard got == Self.request.count, received == Self.request else {
            reply(peer, errno: EPROTO, descriptor: -1)
            return
        }
        var uid: UInt32 = 0
        guard weft_peer_uid(peer, &uid) == 0 else {
            reply(peer, errno: errno, descriptor: -1)
            return
        }
        guard uid == 0 || uid == geteuid() else {
            logger.notice("co-located reads refused to a process of another user", metadata: ["uid": "\(uid)"])
            reply(peer, errno: EPERM, descriptor: -1)
            return
        }
        let store = open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard store >= 0 else {
            let code = errno
            logger.error("co-located reads: cannot open \(directory): \(String(cString: strerror(code)))")
            reply(peer, errno: code, descriptor: -1)
            return
        }
        defer { close(store) }
        if reply(peer, errno: 0, descriptor: store) { handshakes.add(1, ordering: .relaxed) }
    }

    @discardableResult
    private func reply(_ peer: Int32, errno code: Int32, descriptor: Int32) -> Bool {
        var bytes = Self.replyMagic
        bytes.append(UInt8(truncatingIfNeeded: code))
        bytes.append(UInt8(truncatingIfNeeded: code >> 8))
        let sent = bytes.withUnsafeBytes { weft_send_with_descriptor(peer, $0.baseAddress, $0.count, descriptor) }
        return sent == bytes.count
    }
}

/// The agent's side: asks its hub over a connection, checks that nothing stands between them,
/// and opens the hub's chunk store for reading (SPEC.md §4, Co-located reads).
enum LocalReadClient {
    /// The reply of opcode 56: the socket's name and the hub's view of this connection's peer.
    struct Offer: Equatable {
        var name: String
        var peer: String

        func encoded() -> [UInt8] {
            var writer = ByteWriter()
            writer.string(name)
            writer.string(peer)
            return writer.bytes
        }

        static func decode(_ bytes: [UInt8]) throws -> Offer {
            try bytes.withUnsafeBytes { raw in
                var reader = ByteReader(raw)
                let offer = Offer(name: try reader.string(max: 107), peer: try reader.string(max: 128))
                guard reader.isAtEnd else { throw WeftError(EBADMSG, "trailing bytes after a localReads reply") }
                return offer
            }
        }
    }

    /// A socket's end as `Sockets.peerName` and `localName` give it, if it is an IP address
    /// and port (not a Unix socket, not unknown).
    static func endpoint(_ name: String) -> String? {
        name.hasSuffix("peer") || name.isEmpty ? nil : name
    }

    /// Why co-located reads cannot be used on a connection.
    struct Refusal: Error, CustomStringConvertible {
        let description: String
    }

    /// Connects to the offered socket and receives the store's directory; throws `Refusal`
    /// when the hub is not this process's direct peer or the handshake fails.
    static func openStore(_ offer: Offer, localEndpoint: String?, logger: Logger) throws -> ChunkStore {
        guard let localEndpoint, localEndpoint == offer.peer else {
            throw Refusal(description: "the hub sees this connection come from \(offer.peer), not \(localEndpoint ?? "an IP address"): something relays it")
        }
        guard offer.name.hasPrefix(LocalReadServer.namePrefix) else {
            throw Refusal(description: "the hub offered an unexpected socket name")
        }
        let socket = weft_connect_abstract(offer.name)
        guard socket >= 0 else {
            throw Refusal(description: "cannot connect to the hub's socket (\(String(cString: strerror(errno)))): another machine or network namespace")
        }
        defer { close(socket) }
        Sockets.setReceiveTimeout(socket, ms: LocalReadServer.handshakeTimeoutMs)
        let request = LocalReadServer.request
        let sent = request.withUnsafeBytes { weft_send_with_descriptor(socket, $0.baseAddress, $0.count, -1) }
        guard sent == request.count else { throw Refusal(description: "cannot send the request: \(String(cString: strerror(errno)))") }
        var reply = [UInt8](repeating: 0, count: LocalReadServer.replyBytes)
        var descriptor: Int32 = -1
        let got = reply.withUnsafeMutableBytes { weft_receive_with_descriptor(socket, $0.baseAddress, $0.count, &descriptor) }
        let code = got == reply.count ? Int32(reply[6]) | Int32(reply[7]) << 8 : EPROTO
        guard got == reply.count, Array(reply[0..<6]) == LocalReadServer.replyMagic, code == 0, descriptor >= 0 else {
            if descriptor >= 0 { close(descriptor) }
            throw Refusal(description: "the hub refused: \(String(cString: strerror(code == 0 ? EPROTO : code)))")
        }
        var status = stat()
        guard fstat(descriptor, &status) == 0, (status.st_mode & S_IFMT) == S_IFDIR else {
            close(descriptor)
            throw Refusal(description: "the hub sent a descriptor that is not a directory")
        }
        let path = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/\(descriptor)"))
            ?? "hub chunk store"
        return ChunkStore(readingFrom: descriptor, directory: path, logger: logger)
    }
}

/// What `RemoteHub` knows of co-located reads on its current connection.
struct LocalStoreState: @unchecked Sendable {
    /// The connection the store was asked for on (weak: a new connection asks again).
    weak var connection: ClientConnection?
    /// The hub's store, or nil: not offered, refused, or being asked for.
    var store: ChunkStore?
}

extension RemoteHub {
    /// The co-located hub's store for the current connection, if it has one: asked for by the
    /// connection's first read (the other reads meanwhile go to the hub).
    func localStore() -> ChunkStore? {
        guard localReads, let connection = currentConnection() else { return nil }
        let known: ChunkStore?? = localStoreState.withLock { state in
            if state.connection === connection { return .some(state.store) }
            state.connection = connection
            state.store = nil
            return .none
        }
        if let known { return known }
        let store = openLocalStore(connection)
        localStoreState.withLock { state in
            if state.connection === connection { state.store = store }
        }
        return store
    }

    private func openLocalStore(_ connection: ClientConnection) -> ChunkStore? {
        let offer: LocalReadClient.Offer
        do {
            guard case let .bytes(bytes) = try call(.localReads) else { throw shapeMismatch(.localReads) }
            offer = try LocalReadClient.Offer.decode(bytes)
        } catch let error as WeftError where error.errno == ENOSYS {
            logger.debug("co-located reads: not offered", metadata: ["hub": "\(address)"])
            return nil
        } catch {
            logger.notice("co-located reads off for this connection: the hub did not say where (\(error))",
                          metadata: ["hub": "\(address)"])
            return nil
        }
        do {
            let store = try LocalReadClient.openStore(offer, localEndpoint: LocalReadClient.endpoint(connection.localEndpoint),
                                                      logger: logger)
            logger.notice("co-located reads on: reading objects from \(store.directory)", metadata: ["hub": "\(address)"])
            return store
        } catch {
            logger.notice("co-located reads off for this connection: \(error)", metadata: ["hub": "\(address)"])
            return nil
        }
    }

    /// Reads from the co-located store when there is one (SPEC.md §4, Co-located reads): true
    /// if it did; false to read from the hub. A block that fails its check here is read once
    /// more through `readSlice`, which the hub checks and logs itself.
    func readLocally(_ context: RequestContext, id: SliceID, offset: UInt32,
                     into destination: UnsafeMutableRawBufferPointer) throws -> Bool {
        guard let store = localStore() else { return false }
        do {
            try store.read(id: id, offset: Int(offset), into: destination)
            localReadsServed.add(1, ordering: .relaxed)
            return true
        } catch let error as WeftError where error.errno == EIO {
            localReadsFellBack.add(1, ordering: .relaxed)
            try readSliceChecked(context, id: id, offset: offset, into: destination)
            return true
        } catch {
            localReadsFellBack.add(1, ordering: .relaxed)
            return false
        }
    }
}
