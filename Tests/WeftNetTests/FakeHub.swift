#if canImport(Glibc)
import Glibc
#endif
import Foundation
import WeftProto

/// A scripted `HubAPI` for transport tests. Behaviour is keyed on names and inode numbers:
/// - lookup "missing" throws ENOENT with a message; "slow-N" sleeps N ms; "block" waits for
///   `releaseBlocked()`; any other name answers attributes whose `uid` is the session id seen;
/// - getattr answers attributes whose `ino` is the one asked and whose `uid` is the session id,
///   after `getattrDelayMs(ino)` ms;
/// - writeSlice stores the data; readSlice returns it (or a deterministic pattern).
final class FakeHub: HubAPI, @unchecked Sendable {
    private let lock = NSCondition()
    private var nextSession: SessionID
    private(set) var openedSessions: [SessionID: String] = [:]
    private(set) var closedSessions: [SessionID] = []
    private(set) var seenSessions: [SessionID] = []
    private(set) var slices: [SliceID: [UInt8]] = [:]
    private var blockedReleased = false
    private var running = 0
    private(set) var maxRunning = 0
    private(set) var blockedCount = 0
    var getattrDelayMs: @Sendable (InodeID) -> Int = { _ in 0 }
    var blockAll = false
    /// Answers `releaseMany` with ENOSYS, as a hub older than opcode 48 would.
    var predatesReleaseMany = false
    /// Inodes released, one entry per release, and the `releaseMany` calls that carried them.
    private(set) var released: [InodeID] = []
    private(set) var releaseManyCalls = 0
    /// Answers `syncFile` with ENOSYS, as a hub older than opcode 52 would.
    var predatesSyncFile = false
    /// The volume `openSession` reports.
    var volume = FakeHub.volume
    /// How `writeObject` answers: nil stores the image in `objectImages`; ENOSYS is a hub older
    /// than opcode 54; EBADMSG a hub that refused the image.
    var writeObjectErrno: Int32? = nil
    private(set) var objectImages: [SliceID: [UInt8]] = [:]
    /// `writeObject` calls, accepted or not.
    private(set) var writeObjectCalls = 0
    /// Answers `openLayout` with ENOSYS, as a hub older than opcode 53 would.
    var predatesOpenLayout = false
    /// The inodes of `open` and of `openLayout` calls, in order.
    private(set) var opened: [InodeID] = []
    private(set) var openedWithLayout: [InodeID] = []
    /// `sync` calls, and the inodes of `syncFile` calls, in order.
    private(set) var syncs = 0
    private(set) var syncedFiles: [InodeID] = []

    /// Uncompressed unless a test sets `volume` (a zstd volume's uploads go compressed, opcode 54).
    static let volume = VolumeInfo(formatVersion: 1, uuid: Array(0..<16), chunkSizeBytes: 4 << 20, compression: .none,
                                   createdNs: 1_700_000_000_123_456_789)

    init(firstSession: SessionID = 100) {
        nextSession = firstSession
    }

    func snapshot<T>(_ body: (FakeHub) -> T) -> T {
        lock.lock(); defer { lock.unlock() }
        return body(self)
    }

    func releaseBlocked() {
        lock.lock()
        blockedReleased = true
        lock.broadcast()
        lock.unlock()
    }

    /// Waits until `count` requests are blocked, or 5 s.
    func waitForBlocked(_ count: Int) -> Bool {
        let deadline = Date().addingTimeInterval(5)
        lock.lock(); defer { lock.unlock() }
        while blockedCount < count {
            if !lock.wait(until: deadline) { return false }
        }
        return true
    }

    private func enter(_ context: RequestContext?) {
        lock.lock()
        running += 1
        maxRunning = max(maxRunning, running)
        if let context { seenSessions.append(context.session) }
        if blockAll { blockLocked() }
        lock.unlock()
    }

    private func leave() {
        lock.lock(); running -= 1; lock.unlock()
    }

    private func blockLocked() {
        blockedCount += 1
        lock.broadcast()
        while !blockedReleased { lock.wait() }
        blockedCount -= 1
    }

    static func attributes(ino: InodeID, session: SessionID) -> Attributes {
        Attributes(ino: ino, mode: 0o100644, nlink: 1, uid: UInt32(truncatingIfNeeded: session), gid: 7, size: 4096,
                   atimeNs: 1, mtimeNs: 2, ctimeNs: 3, dataVersion: 9)
    }

    // MARK: HubAPI

    func openSession(agentName: String) throws -> (SessionID, VolumeInfo) {
        enter(nil); defer { leave() }
        lock.lock(); defer { lock.unlock() }
        let id = nextSession
        nextSession += 1
        openedSessions[id] = agentName
        return (id, volume)
    }

    func closeSession(_ session: SessionID) throws {
        enter(nil); defer { leave() }
        lock.lock(); defer { lock.unlock() }
        guard openedSessions.removeValue(forKey: session) != nil else { throw WeftError(ENOENT, "no session \(session)") }
        closedSessions.append(session)
        lock.broadcast()
    }

    func lookup(_ context: RequestContext, parent: InodeID, name: [UInt8]) throws -> Attributes {
        enter(context); defer { leave() }
        let text = String(decoding: name, as: UTF8.self)
        if text == "missing" { throw WeftError(ENOENT, "no entry 'missing' in \(parent)") }
        if text.hasPrefix("slow-"), let ms = Int(text.dropFirst(5)) { usleep(UInt32(ms) * 1000) }
        if text == "block" {
            lock.lock(); blockLocked(); lock.unlock()
        }
        return Self.attributes(ino: parent &+ 1, session: context.session)
    }

    func getattr(_ context: RequestContext, ino: InodeID) throws -> Attributes {
        enter(context); defer { leave() }
        let delayMs = getattrDelayMs(ino)
        if delayMs > 0 { usleep(UInt32(delayMs) * 1000) }
        return Self.attributes(ino: ino, session: context.session)
    }

    func setattr(_ context: RequestContext, ino: InodeID, _ changes: SetAttributes) throws -> Attributes {
        enter(context); defer { leave() }
        var attributes = Self.attributes(ino: ino, session: context.session)
        if let mode = changes.mode { attributes.mode = mode }
        if let size = changes.size { attributes.size = size }
        return attributes
    }

    func create(_ context: RequestContext, parent: InodeID, name: [UInt8], mode: UInt32, rdev: UInt32, umask: UInt32,
                exclusive: Bool) throws -> Attributes {
        enter(context); defer { leave() }
        if exclusive && name == Array("exists".utf8) { throw WeftError.exists }
        var attributes = Self.attributes(ino: 1000, session: context.session)
        attributes.mode = mode & ~umask
        attributes.rdev = rdev
        return attributes
    }

    func mkdir(_ context: RequestContext, parent: InodeID, name: [UInt8], mode: UInt32, umask: UInt32) throws -> Attributes {
        enter(context); defer { leave() }
        var attributes = Self.attributes(ino: 1001, session: context.session)
        attributes.mode = UInt32(S_IFDIR) | (mode & ~umask)
        return attributes
    }

    func unlink(_ context: RequestContext, parent: InodeID, name: [UInt8]) throws {
        enter(context); defer { leave() }
        if name == Array("missing".utf8) { throw WeftError.notFound }
    }

    func rmdir(_ context: RequestContext, parent: InodeID, name: [UInt8]) throws {
        enter(context); defer { leave() }
        throw WeftError(ENOTEMPTY, "directory not empty")
    }

    func symlink(_ context: RequestContext, parent: InodeID, name: [UInt8], target: [UInt8]) throws -> Attributes {
        enter(context); defer { leave() }
        var attributes = Self.attributes(ino: 1002, session: context.session)
        attributes.size = UInt64(target.count)
        return attributes
    }

    func readlink(_ context: RequestContext, ino: InodeID) throws -> [UInt8] {
        enter(context); defer { leave() }
        return Array("../target/of/\(ino)".utf8)
    }

    func link(_ context: RequestContext, ino: InodeID, newParent: InodeID, newName: [UInt8]) throws -> Attributes {
        enter(context); defer { leave() }
        var attributes = Self.attributes(ino: ino, session: context.session)
        attributes.nlink = 2
        return attributes
    }

    func rename(_ context: RequestContext, parent: InodeID, name: [UInt8], newParent: InodeID, newName: [UInt8],
                flags: RenameFlags) throws {
        enter(context); defer { leave() }
        if parent != newParent && flags.contains(.exchange) { throw WeftError.crossDevice }
    }

    func readdir(_ context: RequestContext, ino: InodeID, after: [UInt8]?, limit: Int) throws -> [DirectoryEntry] {
        enter(context); defer { leave() }
        let start = after.map { Int(String(decoding: $0, as: UTF8.self).dropFirst(5)) ?? 0 } ?? -1
        return (0..<min(limit, 50)).map { offset in
            let index = start + 1 + offset
            return DirectoryEntry(name: Array("entry\(index)".utf8), ino: 5000 + UInt64(index),
                                  attributes: Self.attributes(ino: 5000 + UInt64(index), session: context.session))
        }
    }

    func access(_ context: RequestContext, ino: InodeID, mask: UInt32) throws {
        enter(context); defer { leave() }
        if mask & 2 != 0 && context.credentials.uid != 0 { throw WeftError.accessDenied }
    }

    func open(_ context: RequestContext, ino: InodeID, flags: Int32) throws -> Attributes {
        enter(context); defer { leave() }
        lock.withLock { opened.append(ino) }
        return Self.attributes(ino: ino, session: context.session)
    }

    func openLayout(_ context: RequestContext, ino: InodeID, flags: Int32, chunkCount: UInt32,
                    dataMaxBytes: UInt32) throws -> OpenedLayout {
        enter(context); defer { leave() }
        if predatesOpenLayout { throw WeftError(ENOSYS, "opcode 53 is unknown to this hub") }
        lock.withLock { openedWithLayout.append(ino) }
        return OpenedLayout(attributes: Self.attributes(ino: ino, session: context.session),
                            chunks: (0..<chunkCount).map {
                                [Slice(id: UInt64($0) + 1, offsetInChunk: 0, length: 4096, sliceOffset: 0, objectLength: 4096)]
                            },
                            data: Array(repeating: UInt8(truncatingIfNeeded: ino), count: Int(min(dataMaxBytes, 100))))
    }

    func release(_ context: RequestContext, ino: InodeID) throws {
        enter(context); defer { leave() }
        lock.withLock { released.append(ino) }
    }

    func releaseMany(_ context: RequestContext, inos: [InodeID]) throws {
        enter(context); defer { leave() }
        if predatesReleaseMany { throw WeftError(ENOSYS, "opcode 48 is unknown to this hub") }
        lock.withLock {
            releaseManyCalls += 1
            released += inos
        }
    }

    func getxattr(_ context: RequestContext, ino: InodeID, name: [UInt8]) throws -> [UInt8] {
        enter(context); defer { leave() }
        if name == Array("user.none".utf8) { throw WeftError.noData }
        return name + [0, 1, 2]
    }

    func setxattr(_ context: RequestContext, ino: InodeID, name: [UInt8], value: [UInt8], flags: XattrFlags) throws {
        enter(context); leave()
    }

    func listxattr(_ context: RequestContext, ino: InodeID) throws -> [[UInt8]] {
        enter(context); defer { leave() }
        return [Array("user.a".utf8), Array("user.bb".utf8), []]
    }

    func removexattr(_ context: RequestContext, ino: InodeID, name: [UInt8]) throws {
        enter(context); leave()
    }

    func statfs(_ context: RequestContext) throws -> FileSystemStats {
        enter(context); defer { leave() }
        return FileSystemStats(blockSizeBytes: 65536, totalBlocks: 1 << 40, freeBlocks: 1 << 39, totalInodes: 1 << 32,
                               freeInodes: 12345, nameMaxBytes: 255)
    }

    func allocateSliceIDs(_ context: RequestContext, count: UInt32) throws -> SliceID {
        enter(context); defer { leave() }
        return 1 << 33 + UInt64(count)
    }

    func writeSlice(_ context: RequestContext, id: SliceID, data: [UInt8]) throws {
        enter(context); defer { leave() }
        lock.lock(); slices[id] = data; lock.unlock()
    }

    func writeObject(_ context: RequestContext, id: SliceID, image: UnsafeRawBufferPointer) throws {
        enter(context); defer { leave() }
        lock.lock(); defer { lock.unlock() }
        writeObjectCalls += 1
        if let writeObjectErrno { throw WeftError(writeObjectErrno, "writeObject refused by the fake hub") }
        objectImages[id] = Array(image)
    }

    /// readSlice of this id answers after 600 ms.
    static let slowSliceID: SliceID = 80

    func readSlice(_ context: RequestContext, id: SliceID, offset: UInt32, length: UInt32) throws -> [UInt8] {
        enter(context); defer { leave() }
        if id == Self.slowSliceID { usleep(600_000) }
        lock.lock(); let stored = slices[id]; lock.unlock()
        guard let stored else { throw WeftError(EIO, "slice \(id) damaged") }
        let start = min(Int(offset), stored.count), end = min(start + Int(length), stored.count)
        return Array(stored[start..<end])
    }

    func layout(_ context: RequestContext, ino: InodeID, firstChunk: UInt32, count: UInt32) throws -> (Attributes, [[Slice]]) {
        enter(context); defer { leave() }
        var chunks: [[Slice]] = []
        for chunk in 0..<count {
            var slices: [Slice] = []
            for index in 0..<(firstChunk + chunk) % 3 {
                let id = UInt64(firstChunk + chunk) << 8 + UInt64(index)
                slices.append(Slice(id: id, offsetInChunk: index * 100, length: 100, sliceOffset: 7, objectLength: 4096))
            }
            chunks.append(slices)
        }
        return (Self.attributes(ino: ino, session: context.session), chunks)
    }

    func commitSlices(_ context: RequestContext, ino: InodeID, slices: [SliceCommit], minimumSize: UInt64,
                      durable: Bool) throws -> Attributes {
        enter(context); defer { leave() }
        var attributes = Self.attributes(ino: ino, session: context.session)
        attributes.size = minimumSize
        attributes.dataVersion = UInt64(slices.count)
        return attributes
    }

    func sync(_ context: RequestContext) throws {
        enter(context); defer { leave() }
        lock.withLock { syncs += 1 }
    }

    func syncFile(_ context: RequestContext, ino: InodeID) throws {
        enter(context); defer { leave() }
        if predatesSyncFile { throw WeftError(ENOSYS, "opcode 52 is unknown to this hub") }
        lock.withLock { syncedFiles.append(ino) }
    }

    func lock(_ context: RequestContext, ino: InodeID, _ request: LockRequest) throws -> LockDescription {
        enter(context); defer { leave() }
        if request.start > request.end { throw WeftError(EINVAL) }
        return request.test ? LockDescription(type: .write, start: request.start, end: request.end, pid: 42) : .none
    }

    func status() throws -> HubStatus {
        enter(nil); defer { leave() }
        let agents = snapshot { Array($0.openedSessions.values).sorted() }
        return HubStatus(volume: Self.volume, logicalBytes: 1 << 41, inodes: 77, chunks: 88, storedBytes: 99,
                         connectedAgents: UInt32(agents.count), agents: agents)
    }

    func fsck(repair: Bool) throws -> FsckReport {
        enter(nil); defer { leave() }
        return FsckReport(inodesChecked: 10, chunksChecked: 20, problems: ["orphan chunk 5"],
                          repaired: repair ? ["removed chunk 5"] : [], remaining: repair ? [] : ["orphan chunk 5"])
    }
}
