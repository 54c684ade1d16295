#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Logging
import WeftProto

/// A directory of immutable, checksummed, optionally compressed chunk objects ("slices").
///
/// Guarantees:
/// - an object is written once and never changes; writing an existing id throws EEXIST;
/// - a reader never sees a partly written object, and never gets wrong bytes: every 64 KiB
///   block a read touches is checked against its CRC32C, and damage throws EIO after one log
///   line naming the chunk, its file and the block;
/// - written objects and deletions are durable only once `sync()` returns;
/// - every method is safe to call from many threads at once; no lock is held across disk I/O.
///
/// One `ChunkStore` owns its directory: opening a second one on the same directory while the
/// first is writing is unsupported (start-up removes leftover temporary files).
/// Memory is bounded: at most `openObjectCacheCapacity` objects stay open (one descriptor and
/// block table each), at most `WorkspacePool.maxIdle` scratch workspaces (128 KiB plus zstd
/// contexts each) are kept, and at most `DurabilityQueue.maxPendingFiles` unsynced objects
/// hold a descriptor.
public final class ChunkStore: @unchecked Sendable {
    /// Most objects kept open with their parsed headers; the least recently used is closed beyond.
    public static let openObjectCacheCapacity = 512
    /// The format version this build writes and reads.
    public static let formatVersion = Int(ChunkFormat.version)

    public let directory: String
    /// Compression applied to new objects; objects of either kind read back the same.
    public let compression: Compression
    let logger: Logger
    /// Descriptor of `directory`; every object path is resolved relative to it.
    let root: Int32
    let cache = ObjectCache(capacity: ChunkStore.openObjectCacheCapacity)
    let workspaces = WorkspacePool()
    let compressionImages = ImagePool.shared
    private let durability: DurabilityQueue
    private let accountingLock = Lock()
    private var objects: UInt64 = 0
    private var bytes: UInt64 = 0
    private var temporarySequence: UInt32 = 0
    /// Free bytes no object may take (SPEC.md §9.1): kept for metadata, so that a full disk
    /// still takes the unlink that frees it. 0: none.
    private var reserve: UInt64 = 0
    /// Whether O_DIRECT is used for aligned transfers; switched off for good when refused.
    let directIO: DirectIOSwitch
    /// Whether reads may bypass the page cache (writes still may).
    let directReads: Bool
    /// Stored-block spans kept in memory for the agents a hub serves (SPEC.md §4, Hub read
    /// cache); nil: spans are sent from the page cache.
    let spanCache: SpanCache?
    /// A store opened by `init(readingFrom:)`: every write, delete or rewrite throws EROFS.
    let readOnly: Bool

    /// Opens the store in `directory`, creating it (and its 256 fan-out directories) if needed,
    /// removing temporary files left by a crash, and counting the objects present.
    /// `directIO` false keeps every transfer in the page cache (tests of the buffered path);
    /// `directReads` false keeps reads there (a store whose objects many readers share).
    /// `spanCacheBytes` above 0 keeps stored-block spans (`storedBlocks`) in memory of that bound.
    public init(directory: String, compression: Compression, logger: Logger, directIO: Bool = true,
                directReads: Bool = true, spanCacheBytes: Int = 0) throws {
        self.directory = directory
        self.directIO = DirectIOSwitch(enabled: directIO)
        self.directReads = directReads
        spanCache = spanCacheBytes > 0 ? SpanCache(boundBytes: spanCacheBytes) : nil
        readOnly = false
        self.compression = compression
        self.logger = logger
        do {
            try FileIO.makeDirectories(directory)
        } catch {
            logger.error("cannot create chunk directory \(directory): \(error.description)")
            throw WeftError(error.errno, "cannot create chunk directory \(directory)")
        }
        root = open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard root >= 0 else {
            let code = errno
            logger.error("cannot open chunk directory \(directory): \(String(cString: strerror(code)))")
            throw WeftError(code, "cannot open chunk directory \(directory)")
        }
        durability = DurabilityQueue(root: root, logger: logger)
        do {
            try prepareFanOutDirectories()
            try scan()
        } catch {
            close(root)
            throw error
        }
    }

    /// A store that only reads the objects of the chunk directory open at `root` (which it takes
    /// over and closes), another process's store: no scan, no clean-up of temporary files, no
    /// counts; every write, delete or rewrite throws EROFS. Reads check every block as always,
    /// with O_DIRECT where it works. `directory` names it in log lines (SPEC.md §4, Co-located
    /// reads).
    public init(readingFrom root: Int32, directory: String, logger: Logger) {
        self.directory = directory
        self.root = root
        self.logger = logger
        compression = .none
        directIO = DirectIOSwitch(enabled: true)
        directReads = true
        spanCache = nil
        readOnly = true
        durability = DurabilityQueue(root: root, logger: logger)
    }

    deinit {
        close(root)
    }

    /// Throws EROFS for a change to a store opened by `init(readingFrom:)`.
    func checkWritable(_ id: SliceID) throws {
        if readOnly { throw WeftError(EROFS, "chunk \(hex(id)): this store only reads another process's objects") }
    }

    // MARK: Space

    /// The reserve a store keeps unless told otherwise: 5% of its file system, at most 256 MiB.
    public static func defaultReserveBytes(directory: String) -> UInt64 {
        var disk = statvfs()
        guard statvfs(directory, &disk) == 0 else { return 0 }
        let total = UInt64(disk.f_blocks) * UInt64(disk.f_frsize)
        return min(total / 20, 256 << 20)
    }

    /// Free bytes kept for metadata: an object that would leave less free is refused (ENOSPC).
    public var reserveBytes: UInt64 { accountingLock.withLock { reserve } }

    public func setReserve(_ bytes: UInt64) { accountingLock.withLock { reserve = bytes } }

    /// Size and free space (for unprivileged writers) of the store's file system.
    public func space() throws -> (totalBytes: UInt64, freeBytes: UInt64) {
        var disk = statvfs()
        guard fstatvfs(root, &disk) == 0 else { throw WeftError(errno, "statvfs \(directory)") }
        let fragment = UInt64(disk.f_frsize)
        return (UInt64(disk.f_blocks) * fragment, UInt64(disk.f_bavail) * fragment)
    }

    /// Throws ENOSPC when writing `bytes` more would leave less than the reserve free.
    func checkReserve(_ id: SliceID, bytes: Int) throws {
        let reserve = reserveBytes
        guard reserve > 0 else { return }
        let free = try space().freeBytes
        // Round up to whole 4 KiB blocks, as the file system allocates them.
        let needed = (UInt64(bytes) + 4095) / 4096 * 4096
        guard free < needed + reserve else { return }
        throw WeftError(ENOSPC, "hub disk full: chunk \(hex(id)) needs \(needed >> 10) KiB, \(free >> 20) MiB free, "
                            + "\(reserve >> 20) MiB kept for metadata")
    }

    // MARK: Writing

    /// Stores object `id` (at most `Limits.chunkSizeMaxBytes`). Not durable until `sync()`.
    /// Throws EEXIST if the id exists, EINVAL if too large, ENOSPC when the disk is full.
    ///
    /// An uncompressed object from page-aligned memory is written with O_DIRECT (no copy into
    /// the page cache) where the file system allows it.
    public func write(id: SliceID, data: UnsafeRawBufferPointer) throws {
        try write(id: id, data: data, finish: .link)
    }

    /// How a created object file ends up: linked to its name (a new object), renamed over it
    /// (`rewriteJournaled`), or left under the temporary name of a tag for weftd to take over
    /// (`writeTemporary`, SPEC.md §4 Co-located writes).
    enum Finish: Equatable {
        case link
        case replace
        case temporary(tag: UInt32)
    }

    /// `write`, or as `finish` says: the atomic replacement of an existing object's file by a
    /// new one with the same bytes, or a temporary file left for `adopt`.
    /// `compression` overrides the store's (an agent's temporary object for a zstd volume).
    func write(id: SliceID, data: UnsafeRawBufferPointer, finish: Finish, compression: Compression? = nil) throws {
        if case .temporary = finish {} else { try checkWritable(id) }
        let compression = compression ?? self.compression
        guard data.count <= ChunkFormat.maxRawBytes else {
            throw WeftError(EINVAL, "chunk \(hex(id)) is \(data.count) bytes, over the \(ChunkFormat.maxRawBytes)-byte limit")
        }
        if compression == .zstd,
           let image = ChunkImage.Encoded.compress(id: id, data: data, workspaces: workspaces, images: compressionImages) {
            defer { compressionImages.give(image.buffer) }
            try store(id: id, image: image.bytes, layout: image.layout, finish: finish)
            return
        }
        // Uncompressed (or nothing shrank): the payload is written straight from the caller's buffer.
        let blockSize = ChunkFormat.blockSizeBytes
        let blockCount = ChunkFormat.blockCount(rawLength: data.count)
        let headerLength = ChunkFormat.headerBytes(blockCount: blockCount)
        let dataOffset = ChunkFormat.dataOffset(blockCount: blockCount, anyCompressed: false, rawLength: data.count)
        var blocks = ContiguousArray<BlockEntry>()
        blocks.reserveCapacity(blockCount)
        for index in 0..<blockCount {
            let start = index * blockSize
            let raw = UnsafeRawBufferPointer(rebasing: data[start..<min(start + blockSize, data.count)])
            blocks.append(BlockEntry(fileOffset: dataOffset + start, storedLength: raw.count, crc: crc32c(raw),
                                     compressed: false))
        }
        // The header and its zero padding, page-aligned for direct I/O.
        let header = UnsafeMutableRawBufferPointer.allocate(byteCount: dataOffset, alignment: ChunkFormat.directAlignment)
        defer { header.deallocate() }
        header.initializeMemory(as: UInt8.self, repeating: 0)
        blocks.withUnsafeBufferPointer {
            ChunkFormat.encodeHeader(into: UnsafeMutableRawBufferPointer(rebasing: header[0..<headerLength]), id: id,
                                     compression: compression, rawLength: data.count, dataOffset: dataOffset,
                                     blocks: $0)
        }
        let fileBytes = dataOffset + data.count
        // An object the journal may carry (at most 64 KiB) stays in the page cache: a strict
        // commit reads its bytes back for its record (SPEC.md §5, Small objects in the journal).
        let direct = dataOffset % ChunkFormat.directAlignment == 0 && data.count > Limits.journaledObjectMaxBytes
            && Int(bitPattern: data.baseAddress) % ChunkFormat.directAlignment == 0 && directIO.isEnabled
        let fd = try createObject(id: id, header: UnsafeRawBufferPointer(header), payload: data.isEmpty ? [] : [data],
                                  direct: direct ? data : nil, finish: finish)
        try written(id, fd: fd, layout: ChunkLayout(rawLength: data.count, dataOffset: dataOffset, blocks: blocks,
                                                fileBytes: fileBytes), finish: finish)
    }

    /// Stores object `id` from the image of a compressed object that an agent built and sent
    /// (SPEC.md §4, Compressed uploads), after checking it as a read would (`ChunkImage.verify`):
    /// EBADMSG for an image that fails a check, then EINVAL for a raw length over
    /// `maxRawLength`, with nothing stored; otherwise as `write`.
    public func writeImage(id: SliceID, image: UnsafeRawBufferPointer, maxRawLength: Int = Limits.chunkSizeMaxBytes) throws {
        try checkWritable(id)
        let layout = try ChunkImage.verify(id: id, image: image, workspaces: workspaces)
        guard layout.rawLength <= maxRawLength else {
            throw WeftError(EINVAL, "slice larger than a chunk (\(layout.rawLength) bytes, at most \(maxRawLength))")
        }
        try store(id: id, image: image, layout: layout)
    }

    /// Writes a compressed object's whole image (header, then the payloads): its page-multiple
    /// part with O_DIRECT when the image is page-aligned and the object too large for the
    /// journal to carry (SPEC.md §3.2, Direct I/O).
    private func store(id: SliceID, image: UnsafeRawBufferPointer, layout: ChunkLayout, finish: Finish = .link) throws {
        let direct = directIO.isEnabled && layout.rawLength > Limits.journaledObjectMaxBytes
            && image.count >= ChunkFormat.directAlignment
            && Int(bitPattern: image.baseAddress) % ChunkFormat.directAlignment == 0
        let fd = try createObject(id: id, header: UnsafeRawBufferPointer(start: nil, count: 0), payload: [image],
                                  direct: direct ? image : nil, finish: finish)
        try written(id, fd: fd, layout: layout, finish: finish)
    }

    /// Counts a created object, keeps it open with its layout, and queues it for `sync()`. A
    /// replacement (`.replace`; `createObject` took the replaced file's bytes off the count)
    /// adds its bytes, takes the replaced file's place in the open-object cache, and is not
    /// queued: its caller gives it to the journaled passes. A temporary file (`writeTemporary`)
    /// is only closed: it is weftd's to count once it takes it over (`adopt`).
    func written(_ id: SliceID, fd: Int32, layout: ChunkLayout, finish: Finish = .link) throws {
        if case let .temporary(tag) = finish {
            // Its writeback errors are weftd's fsync's to see (SPEC.md §4, Co-located writes),
            // except one that a file system reports at close (NFS): then it is not handed over.
            guard close(fd) == 0 else {
                let failure = FileIO.Failure(call: "close", errno: errno)
                removeTemporary(id, suffix: tag)
                throw writeFailure(id, failure)
            }
            return
        }
        if finish == .replace {
            // The replaced file's open descriptor (in the cache) reads the old inode: dropped.
            cache.remove(id)
            accountingLock.withLock { bytes += UInt64(layout.fileBytes) }
            cacheWritten(id, layout: layout)
            close(fd)
            return
        }
        accountingLock.withLock {
            objects += 1
            bytes += UInt64(layout.fileBytes)
        }
        cacheWritten(id, layout: layout)
        if durability.objectWritten(id: id, fd: fd) {
            try durability.sync()
        }
    }

    /// Puts the object just written into the open-object cache with the layout its header was
    /// encoded from (no read or decode of it), so that the commit that follows (`length`) and the first reads do not read
    /// the header back: written with O_DIRECT, it is not in the page cache, and that read waited
    /// for the disk, in the writer's commit, once per object (up to milliseconds behind other
    /// uploads). Best effort: a failure leaves the object to be opened from disk as before.
    private func cacheWritten(_ id: SliceID, layout: ChunkLayout) {
        let (cached, token) = cache.lookup(id)
        guard cached == nil else { return }
        let fd = FileIO.withObjectPath(id) { openat(root, $0, O_RDONLY | O_CLOEXEC) }
        guard fd >= 0 else { return }
        _ = cache.insert(OpenObject(id: id, fd: fd, layout: layout), token: token)
    }

    /// `write(id:data:)` for an array.
    public func write(id: SliceID, data: [UInt8]) throws {
        try data.withUnsafeBytes { try write(id: id, data: $0) }
    }

    /// Writes the object under a temporary name, then links it to its final name, which fails
    /// with EEXIST atomically if the id exists. Returns the open descriptor for `sync()`.
    /// With `direct` (the whole payload, page-aligned, after a header of whole pages: a raw
    /// payload after its padded header, or a compressed object's whole image after an empty
    /// one), the header and the page-multiple part of the payload go out with O_DIRECT and the
    /// last partial page buffered. `finish` `.replace` renames it over the existing file;
    /// `.temporary` leaves it under the tag's temporary name.
    func createObject(id: SliceID, header: UnsafeRawBufferPointer, payload: [UnsafeRawBufferPointer],
                      direct: UnsafeRawBufferPointer?, finish: Finish = .link) throws -> Int32 {
        try checkReserve(id, bytes: header.count + payload.reduce(0) { $0 + $1.count })
        let suffix: UInt32
        if case let .temporary(tag) = finish {
            suffix = tag
        } else {
            suffix = accountingLock.withLock { () -> UInt32 in
                temporarySequence = (temporarySequence &+ 1) & ~Self.adoptedTagBit
                return temporarySequence
            }
        }
        let fd = FileIO.withObjectPath(id, suffix: suffix) {
            openat(root, $0, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)
        }
        guard fd >= 0 else { throw writeFailure(id, FileIO.Failure(call: "create", errno: errno)) }
        // An agent's file is weftd's to open, whatever the agent's umask (SPEC.md §4, Co-located writes).
        if case .temporary = finish, fchmod(fd, 0o644) != 0 {
            let failure = FileIO.Failure(call: "fchmod", errno: errno)
            close(fd)
            removeTemporary(id, suffix: suffix)
            throw writeFailure(id, failure)
        }
        do {
            if let direct, try writeDirect(fd, header: header, payload: direct) {
                // Written.
            } else {
                try FileIO.writeFully(fd, [header] + payload)
            }
        } catch {
            close(fd)
            removeTemporary(id, suffix: suffix)
            throw writeFailure(id, error)
        }
        switch finish {
        case .temporary:
            return fd
        case .replace:
            // Atomically in place of the existing file: a reader opens the old one or the new.
            var old = stat()
            let hadOld = FileIO.withObjectPath(id) { fstatat(root, $0, &old, AT_SYMLINK_NOFOLLOW) } == 0
            let renamed = FileIO.withObjectPath(id, suffix: suffix) { temporary in
                FileIO.withObjectPath(id) { final in renameat(root, temporary, root, final) }
            }
            guard renamed == 0 else {
                let renameError = errno
                close(fd)
                removeTemporary(id, suffix: suffix)
                throw writeFailure(id, FileIO.Failure(call: "rename", errno: renameError))
            }
            // Only objects this store wrote and counted are replaced (the journal's, restored at
            // open), so a missing one vanished behind its back (damage) and is still counted,
            // with the same bytes as its replacement (`written` adds them back).
            var replacement = stat()
            let replaced = hadOld ? UInt64(old.st_size) : (fstat(fd, &replacement) == 0 ? UInt64(replacement.st_size) : 0)
            accountingLock.withLock { bytes -= min(bytes, replaced) }
            return fd
        case .link:
            do {
                try placeTemporary(id, suffix: suffix)
            } catch {
                close(fd)
                throw error
            }
            return fd
        }
    }

    /// Gives the temporary file of `suffix` its object's final name, atomically unless the id
    /// exists (EEXIST), and removes the temporary name; on any failure it is removed.
    func placeTemporary(_ id: SliceID, suffix: UInt32) throws {
        let linked = FileIO.withObjectPath(id, suffix: suffix) { temporary in
            FileIO.withObjectPath(id) { final in linkat(root, temporary, root, final, 0) }
        }
        if linked == 0 {
            removeTemporary(id, suffix: suffix)
            return
        }
        let linkError = errno
        if linkError == EEXIST {
            removeTemporary(id, suffix: suffix)
            throw WeftError(EEXIST, "chunk \(hex(id)) exists")
        }
        if linkError == ENOENT && suffix & Self.adoptedTagBit != 0 {
            // An agent's file removed while it was being taken over (swept as stale, or by
            // fsck --repair): the agent sends the object over TCP (SPEC.md §4, Co-located writes).
            throw WeftError(ENOENT, "the agent's chunk \(hex(id)) was removed while it was taken over")
        }
        if linkError == EPERM || linkError == EOPNOTSUPP || linkError == EMLINK {
            // A file system without hard links: check, then rename (not atomic across processes).
            let exists = FileIO.withObjectPath(id) { faccessat(root, $0, F_OK, 0) } == 0
            let renamed = !exists && FileIO.withObjectPath(id, suffix: suffix) { temporary in
                FileIO.withObjectPath(id) { final in renameat(root, temporary, root, final) }
            } == 0
            if renamed { return }
            let renameError = errno
            removeTemporary(id, suffix: suffix)
            if exists { throw WeftError(EEXIST, "chunk \(hex(id)) exists") }
            if renameError == ENOENT && suffix & Self.adoptedTagBit != 0 {
                throw WeftError(ENOENT, "the agent's chunk \(hex(id)) was removed while it was taken over")
            }
            throw writeFailure(id, FileIO.Failure(call: "rename", errno: renameError))
        }
        removeTemporary(id, suffix: suffix)
        throw writeFailure(id, FileIO.Failure(call: "link", errno: linkError))
    }

    /// Removes object `id`'s temporary file of `suffix`, if there is one; false if it is there still.
    @discardableResult
    func removeTemporary(_ id: SliceID, suffix: UInt32) -> Bool {
        FileIO.withObjectPath(id, suffix: suffix) { unlinkat(root, $0, 0) == 0 || errno == ENOENT }
    }

    /// Writes `header` then `payload` from offset 0 of the fresh file `fd`, the page-multiple
    /// part with O_DIRECT. Returns false, having written nothing that matters, when the file
    /// system refuses O_DIRECT (the caller then writes buffered; direct I/O stays off).
    private func writeDirect(_ fd: Int32, header: UnsafeRawBufferPointer, payload: UnsafeRawBufferPointer)
        throws(FileIO.Failure) -> Bool
    {
        let alignedBytes = payload.count / ChunkFormat.directAlignment * ChunkFormat.directAlignment
        let flags = fcntl(fd, F_GETFL)
        guard flags >= 0, fcntl(fd, F_SETFL, flags | O_DIRECT) == 0 else {
            directIO.refused("fcntl(O_DIRECT): \(String(cString: strerror(errno)))", logger: logger)
            return false
        }
        do {
            try FileIO.pwriteFully(fd, header, at: 0)
            if alignedBytes > 0 {
                try FileIO.pwriteFully(fd, UnsafeRawBufferPointer(rebasing: payload[0..<alignedBytes]), at: header.count)
            }
        } catch let failure where failure.errno == EINVAL {
            _ = fcntl(fd, F_SETFL, flags)
            directIO.refused("O_DIRECT write: \(failure.description)", logger: logger)
            return false
        }
        guard fcntl(fd, F_SETFL, flags) == 0 else { throw FileIO.Failure(call: "fcntl", errno: errno) }
        directIO.countWrite()
        if alignedBytes < payload.count {
            try FileIO.pwriteFully(fd, UnsafeRawBufferPointer(rebasing: payload[alignedBytes...]),
                                   at: header.count + alignedBytes)
        }
        return true
    }

    /// ENOSPC and EDQUOT become ENOSPC (not logged: the caller reports a full volume);
    /// anything else is logged once and becomes EIO, except descriptor exhaustion.
    private func writeFailure(_ id: SliceID, _ failure: FileIO.Failure) -> WeftError {
        switch failure.errno {
        case ENOSPC, EDQUOT:
            return WeftError(ENOSPC, "chunk \(hex(id)): no space")
        case EMFILE, ENFILE, EROFS:
            logger.error("chunk \(hex(id)) write failed in \(directory): \(failure.description)")
            return WeftError(failure.errno, "chunk \(hex(id)) write failed")
        default:
            logger.error("chunk \(hex(id)) write failed in \(directory): \(failure.description)")
            return WeftError(EIO, "chunk \(hex(id)) write failed: \(failure.description)")
        }
    }

    /// Counts an object created outside `write` (an imported copy).
    func accountCreated(fileBytes: Int) {
        accountingLock.withLock {
            objects += 1
            bytes += UInt64(fileBytes)
        }
    }

    /// Makes every object written before this call durable (deletes: `syncRemovals`).
    /// Concurrent callers share one pass.
    public func sync() throws {
        try durability.sync()
    }

    // MARK: Objects lost to a failed pass (SPEC.md §3.2)

    /// Makes `inode` and `session` the owners of those of `ids` that wait for a sync pass (or
    /// are in the running one): if that pass fails, `takeFailure` tells each once. Returns those
    /// of `ids` that are lost already, which the commit about to name them must not name. Call
    /// before that commit applies.
    @discardableResult
    public func assign(_ ids: [SliceID], inode: UInt64, session: UInt64) -> [SliceID] {
        durability.assign(ids, inode: inode, session: session)
    }

    /// Those of `ids` that a failed sync pass took: their durability is unknown, and no later
    /// pass repairs that. An id leaves once its object is deleted.
    public func lostObjects(_ ids: [SliceID]) -> [SliceID] { durability.lostObjects(ids) }

    /// Whether a failed pass took an object a commit of this session named (any file), since
    /// the last call for the session that said so (the session's report; the file's stays).
    public func takeFailure(session: UInt64) -> Bool { durability.takeFailure(session: session) }

    /// Whether a failed pass took an object a commit of `inode` named, by `session` or by a
    /// session that has ended, since the last call that said so (the file's report; the
    /// session's stays).
    public func takeFailure(inode: UInt64, session: UInt64) -> Bool {
        durability.takeFailure(inode: inode, session: session)
    }

    /// Forgets a session's unreported failures (the session ended); its inodes' stay.
    public func forgetSession(_ session: UInt64) { durability.forgetSession(session) }

    /// Test hook: an errno makes a sync pass's fsync of that object fail.
    public var testSyncFailure: (@Sendable (SliceID) -> Int32?)? {
        get { durability.testSyncFailure }
        set { durability.testSyncFailure = newValue }
    }

    // MARK: Objects the metadata journal carries (SPEC.md §5, "Small objects in the journal")

    /// Leaves those of `ids` that wait for a sync pass out of the passes that `sync()` runs:
    /// the caller puts their bytes in the metadata record that first references them. Returns
    /// the ids left out (objects already being synced, or past the bound, are not).
    public func coverByJournal(_ ids: [SliceID]) -> [SliceID] { durability.coverByJournal(ids) }

    /// Makes every delete completed before the call durable (`sync()` does not).
    public func syncRemovals() throws { try durability.syncRemovals() }

    /// Whether object `id` was written and waits for a sync pass (no pass has taken it yet).
    public func awaitsSync(id: SliceID) -> Bool { durability.isPending(id) }

    /// The records carrying objects `ids` left out by `coverByJournal` are written.
    public func journalCommitted(_ ids: [SliceID]) { durability.journalCommitted(ids) }

    /// Gives objects `coverByJournal` left out back to the sync passes (their commit failed).
    public func uncover(_ ids: [SliceID]) { durability.uncover(ids) }

    /// Makes objects `ids` durable with their directory entries, however they were written
    /// (at open: objects a killed process left in the page cache).
    public func syncObjects(_ ids: [SliceID]) throws { try durability.syncObjects(ids) }

    /// Syncs the objects the journal carries, then their fan-out directories; returns their ids,
    /// whose journal keys may now go.
    public func syncJournaled() throws -> [SliceID] { try durability.syncJournaled() }

    /// Objects the journal carries that are not synced themselves.
    public var journaledCount: Int { durability.journaledCount }

    /// After a failed `syncJournaled` (`JournaledSyncFailure`): writes object `id` again from
    /// `raw`, the bytes its journal key holds, in place of its file (atomically: readers see the
    /// old file or the new, never none); the caller then gives it back to the passes. The old
    /// file's pages may be clean but never written (a failed writeback), so once evicted they would read as
    /// damage (SPEC.md §5, Small objects in the journal). The disk reserve applies (a full disk
    /// fails it: the caller gives the id back with `needRewrite`, and its key keeps the bytes).
    public func rewriteJournaled(id: SliceID, raw: [UInt8]) throws {
        try raw.withUnsafeBytes { try write(id: id, data: $0, finish: .replace) }
    }

    /// Takes objects the journal carries out of the next `syncJournaled` and out of
    /// `takeRewriteNeeded`, to be written again and given back (`Hub.rewriteCarried`).
    public func takeJournaled(_ ids: Set<SliceID>) { durability.takeJournaled(ids) }

    /// Gives objects the journal carries back to the next `syncJournaled`.
    public func requeueJournaled(_ ids: [SliceID]) { durability.requeueJournaled(ids) }

    /// Takes the objects the journal carries that a failed `syncJournaled` left to be written
    /// again from their keys (`rewriteJournaled`, then `requeueJournaled`).
    public func takeRewriteNeeded() -> [SliceID] { durability.takeRewriteNeeded() }

    /// Gives back objects whose rewrite failed, for the next `takeRewriteNeeded`.
    public func needRewrite(_ ids: [SliceID]) { durability.needRewrite(ids) }

    /// Test hook: an errno makes every `syncfs` of the store fail, as a writeback error would.
    public var testSyncfsFailure: (@Sendable () -> Int32?)? {
        get { durability.testSyncfsFailure }
        set { durability.testSyncfsFailure = newValue }
    }

    /// Writes object `id` again from `raw`, the bytes the journal carries. True if the copy it
    /// held was missing, damaged or other bytes (a crash lost it before it reached the disk).
    /// Written again even when it reads back whole: a read may come from the page cache, whose
    /// pages a failed writeback left clean but never wrote (a hub restarted after a failed
    /// sync of them), and a later `syncfs` of another process is not told of that failure.
    /// Durable after `sync()`. At open only: the disk reserve does not apply (a hub that cannot
    /// write back a lost object cannot open, and cannot free space either).
    public func restore(id: SliceID, raw: [UInt8]) throws -> Bool {
        try checkWritable(id)
        let held = try? read(id: id, offset: 0, length: raw.count)
        let differed = !(held == raw && (try? length(id: id)) == raw.count)
        try delete(id: id)
        let kept = reserveBytes
        setReserve(0)
        defer { setReserve(kept) }
        try write(id: id, data: raw)
        return differed
    }

    // MARK: Deleting and listing

    /// Removes object `id`; a missing object is not an error. Durable after `syncRemovals()`.
    public func delete(id: SliceID) throws {
        try checkWritable(id)
        var info = stat()
        let known = FileIO.withObjectPath(id) { fstatat(root, $0, &info, AT_SYMLINK_NOFOLLOW) } == 0
        let result = FileIO.withObjectPath(id) { unlinkat(root, $0, 0) }
        let code = errno
        // After the unlink, so that a reader that opened the file just before cannot cache it.
        cache.remove(id)
        if result != 0 {
            if code == ENOENT { return }
            logger.error("chunk \(hex(id)) delete failed in \(directory): \(String(cString: strerror(code)))")
            throw WeftError(code == EROFS ? EROFS : EIO, "chunk \(hex(id)) delete failed")
        }
        accountingLock.withLock {
            objects -= min(objects, 1)
            if known { bytes -= min(bytes, UInt64(info.st_size)) }
        }
        durability.objectRemoved(id: id)
    }

    /// Removes every object of `ids`; missing ones are not an error. Durable after `syncRemovals()`.
    /// Throws the first failure, after trying them all.
    public func delete(ids: some Sequence<SliceID>) throws {
        var failure: Error?
        for id in ids {
            do { try delete(id: id) } catch { failure = failure ?? error }
        }
        if let failure { throw failure }
    }

    /// Whether object `id` is stored (complete: partial writes are never visible): a regular
    /// file at its path, or a symbolic link to one (reads follow links). Anything else there (a
    /// directory left by damage) is no object, and fsck reports the object missing.
    public func exists(id: SliceID) -> Bool {
        var info = stat()
        return FileIO.withObjectPath(id) { fstatat(root, $0, &info, 0) } == 0 && info.st_mode & S_IFMT == S_IFREG
    }

    /// Calls `body` with every stored object id, its file size and its modification time
    /// (nanoseconds since the epoch), in no particular order. Objects written or deleted
    /// meanwhile may or may not be reported. No lock is held while `body` runs.
    public func forEach(_ body: (SliceID, _ storedBytes: UInt64, _ modifiedNs: Int64) throws -> Void) throws {
        for fanOut in 0..<256 {
            try listFanOut(fanOut) { id, info in try body(id, UInt64(info.st_size), Self.modifiedNs(info)) }
        }
    }

    /// Calls `body` with each temporary file of a co-located agent's write (its suffix has
    /// `adoptedTagBit`: never one of this store's own writes): the object id, the tag, the
    /// file's size and modification time (nanoseconds since the epoch). `fsck` reports those
    /// that no agent handed over (SPEC.md §4, Co-located writes).
    public func forEachAgentTemporary(_ body: (SliceID, _ tag: UInt32, _ bytes: UInt64, _ modifiedNs: Int64) throws -> Void)
        throws {
        for fanOut in 0..<256 {
            try forEachName(inFanOut: fanOut) { entry, directoryFD in
                guard FileIO.hasTemporarySuffix(entry), let (id, tag) = FileIO.parseTemporaryName(entry),
                      tag & Self.adoptedTagBit != 0 else { return }
                var info = stat()
                guard fstatat(directoryFD, entry, &info, AT_SYMLINK_NOFOLLOW) == 0 else { return }
                try body(id, tag, UInt64(info.st_size), Self.modifiedNs(info))
            }
        }
    }

    /// Direct I/O use so far (see `DirectIOCounters`).
    public var directIOCounters: DirectIOCounters { directIO.counters }

    /// Number of stored objects, kept up to date by writes and deletes.
    public var objectCount: UInt64 { accountingLock.withLock { objects } }
    /// Total size of the stored object files in bytes, kept up to date by writes and deletes.
    public var storedBytes: UInt64 { accountingLock.withLock { bytes } }

    // MARK: Start-up

    private func prepareFanOutDirectories() throws {
        var created = false
        for index in 0..<256 {
            if mkdirat(root, FileIO.fanOutName(index), 0o755) == 0 {
                created = true
            } else if errno != EEXIST {
                let code = errno
                logger.error("cannot create chunk directory \(directory)/\(FileIO.fanOutName(index)): \(String(cString: strerror(code)))")
                throw WeftError(code, "cannot create chunk directory")
            }
        }
        if created {
            do {
                try FileIO.fsyncRetrying(root)
            } catch {
                logger.error("cannot sync chunk directory \(directory): \(error.description)")
                throw WeftError(EIO, "cannot sync chunk directory \(directory)")
            }
        }
    }

    /// Counts the objects present and removes temporary files of interrupted writes.
    private func scan() throws {
        var count: UInt64 = 0
        var total: UInt64 = 0
        for fanOut in 0..<256 {
            try listFanOut(fanOut, removingTemporaries: true) { _, info in
                count += 1
                total += UInt64(info.st_size)
            }
        }
        accountingLock.withLock {
            objects = count
            bytes = total
        }
    }

    /// Calls `body` for each regular object file in one fan-out directory. Names that are not
    /// objects of this directory are skipped.
    private func listFanOut(_ fanOut: Int, removingTemporaries: Bool = false,
                            _ body: (SliceID, stat) throws -> Void) throws {
        try forEachName(inFanOut: fanOut) { entry, directoryFD in
            if FileIO.hasTemporarySuffix(entry) {
                if removingTemporaries && unlinkat(directoryFD, entry, 0) == 0 {
                    logger.info("removed interrupted chunk write \(directory)/\(FileIO.fanOutName(fanOut))/\(String(cString: entry))")
                }
                return
            }
            guard let id = FileIO.parseObjectName(entry), Int(id & 0xFF) == fanOut else { return }
            var info = stat()
            guard fstatat(directoryFD, entry, &info, AT_SYMLINK_NOFOLLOW) == 0,
                  info.st_mode & S_IFMT == S_IFREG
            else { return }
            try body(id, info)
        }
    }

    /// Calls `body` with every name in one fan-out directory and that directory's descriptor;
    /// a directory that cannot be listed is logged and EIO.
    private func forEachName(inFanOut fanOut: Int, _ body: (UnsafePointer<CChar>, Int32) throws -> Void) throws {
        let name = FileIO.fanOutName(fanOut)
        do {
            try FileIO.forEachName(in: root, name, body)
        } catch let failure as FileIO.Failure {
            logger.error("cannot list chunk directory \(directory)/\(name): \(failure.description)")
            throw WeftError(EIO, "cannot list chunk directory \(directory)/\(name)")
        }
    }

    /// A file's modification time in nanoseconds since the epoch.
    private static func modifiedNs(_ info: stat) -> Int64 {
        Int64(info.st_mtim.tv_sec) * 1_000_000_000 + Int64(info.st_mtim.tv_nsec)
    }
}
