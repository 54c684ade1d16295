import Foundation
import Logging
import WeftProto

/// The global root of a cluster (SPEC.md §12.3): a read-only top directory that lists every
/// volume, over one `VFS` per volume opened on first use.
///
/// Inode numbers and handles carry the volume id in their top 16 bits (`volumeID << 48 | n`);
/// the root is inode 1 and its directory handles have volume 0. Guarantees: nothing is created,
/// removed or renamed in the root itself (EPERM: volumes come from `weft volume create`);
/// rename and link across volumes give EXDEV; every other call goes to the volume's own VFS
/// with its local numbers, so each volume keeps exactly its single-volume behaviour.
public final class GlobalNamespace: FileSystemLayer, @unchecked Sendable {
    public struct Volume: Sendable, Equatable {
        public var name: String
        public var id: UInt16

        public init(name: String, id: UInt16) {
            self.name = name
            self.id = id
        }
    }

    public static let rootIno: InodeID = 1
    static let localMask: UInt64 = (1 << 48) - 1
    /// How long a listing of the volumes is reused by lookups in the root.
    static let listingTTLNs: Int64 = 1_000_000_000

    private let listVolumes: () throws -> [Volume]
    private let openVolume: (Volume) throws -> VFS
    let logger: Logger
    private let createdNs = currentTimeNs()

    private let lock = NSLock()
    private var opened: [UInt16: VFS] = [:]
    private var listing: (volumes: [Volume], atNs: Int64)?
    private var rootHandles: [UInt64: [DirectoryEntry]] = [:]
    /// Open handles (global numbers) of volume root directories: their ".." is the global root.
    private var volumeRootHandles: Set<UInt64> = []
    private var nextRootHandle: UInt64 = 1

    /// `listVolumes` gives the cluster's volumes now; `openVolume` opens one as a `VFS`
    /// (sharing the agent's cache and write bound).
    public let leaseCache: LeaseCache

    public init(listVolumes: @escaping () throws -> [Volume], openVolume: @escaping (Volume) throws -> VFS,
                leaseCache: LeaseCache, logger: Logger) {
        self.leaseCache = leaseCache
        self.listVolumes = listVolumes
        self.openVolume = openVolume
        self.logger = logger
    }

    // MARK: Numbers

    @inline(__always) static func volumeID(_ number: UInt64) -> UInt16 { UInt16(truncatingIfNeeded: number >> 48) }
    @inline(__always) static func local(_ number: UInt64) -> UInt64 { number & localMask }
    @inline(__always) static func global(_ volume: UInt16, _ number: UInt64) -> UInt64 { UInt64(volume) << 48 | number }

    private func mapped(_ volume: UInt16, _ attributes: Attributes) -> Attributes {
        var attributes = attributes
        attributes.ino = Self.global(volume, attributes.ino)
        return attributes
    }

    private var rootAttributes: Attributes {
        Attributes(ino: Self.rootIno, mode: UInt32(S_IFDIR) | 0o755, nlink: 2, uid: 0, gid: 0,
                   atimeNs: createdNs, mtimeNs: createdNs, ctimeNs: createdNs)
    }

    private func volumes(fresh: Bool) throws -> [Volume] {
        let now = currentTimeNs()
        if !fresh, let listing = lock.withLock({ listing }), now - listing.atNs < Self.listingTTLNs {
            return listing.volumes
        }
        let volumes = try listVolumes().sorted { $0.name < $1.name }
        lock.withLock { listing = (volumes, now) }
        return volumes
    }

    /// The VFS of volume `id`, opened on first use.
    private func vfs(_ id: UInt16) throws -> VFS {
        if let open = lock.withLock({ opened[id] }) { return open }
        guard id != 0 else { throw WeftError(EINVAL, "not a volume inode") }
        guard let volume = try volumes(fresh: false).first(where: { $0.id == id })
            ?? volumes(fresh: true).first(where: { $0.id == id }) else {
            throw WeftError(ESTALE, "volume \(id) is no longer in the cluster")
        }
        return try open(volume)
    }

    private func open(_ volume: Volume) throws -> VFS {
        if let existing = lock.withLock({ opened[volume.id] }) { return existing }
        let fresh = try openVolume(volume)
        let (winner, loser): (VFS, VFS?) = lock.withLock {
            if let existing = opened[volume.id] { return (existing, fresh) }
            opened[volume.id] = fresh
            return (fresh, nil)
        }
        if let loser { try? loser.shutdown() }
        if loser == nil { logger.info("opened volume \(volume.name) (id \(volume.id))") }
        return winner
    }

    /// The volume and local number of an inode that must not be the root.
    private func inVolume(_ ino: InodeID) throws -> (UInt16, VFS, InodeID) {
        let id = Self.volumeID(ino)
        return (id, try vfs(id), Self.local(ino))
    }

    private func notInRoot(_ what: String) -> WeftError {
        WeftError(EPERM, "\(what) in the global root: volumes are created with `weft volume create`")
    }

    // MARK: Namespace

    public func lookup(_ credentials: Credentials, parent: InodeID, name: [UInt8], caller: Int32 = 0) throws -> Attributes {
        guard parent == Self.rootIno else {
            let (id, vfs, local) = try inVolume(parent)
            if local == 1 && name == [0x2E, 0x2E] { return rootAttributes }
            return mapped(id, try vfs.lookup(credentials, parent: local, name: name, caller: caller))
        }
        if name == [0x2E] || name == [0x2E, 0x2E] { return rootAttributes }
        let text = String(decoding: name, as: UTF8.self)
        guard let volume = try volumes(fresh: false).first(where: { $0.name == text })
            ?? volumes(fresh: true).first(where: { $0.name == text }) else { throw WeftError.notFound }
        return mapped(volume.id, try open(volume).getattr(credentials, ino: 1))
    }

    public func getattr(_ credentials: Credentials, ino: InodeID) throws -> Attributes {
        if ino == Self.rootIno { return rootAttributes }
        let (id, vfs, local) = try inVolume(ino)
        return mapped(id, try vfs.getattr(credentials, ino: local))
    }

    public func setattr(_ credentials: Credentials, ino: InodeID, _ changes: SetAttributes) throws -> Attributes {
        if ino == Self.rootIno { throw notInRoot("changing attributes") }
        let (id, vfs, local) = try inVolume(ino)
        return mapped(id, try vfs.setattr(credentials, ino: local, changes))
    }

    public func mkdir(_ credentials: Credentials, parent: InodeID, name: [UInt8], mode: UInt32, umask: UInt32) throws -> Attributes {
        if parent == Self.rootIno { throw notInRoot("mkdir") }
        let (id, vfs, local) = try inVolume(parent)
        return mapped(id, try vfs.mkdir(credentials, parent: local, name: name, mode: mode, umask: umask))
    }

    public func mknod(_ credentials: Credentials, parent: InodeID, name: [UInt8], mode: UInt32, rdev: UInt32,
                      umask: UInt32) throws -> Attributes {
        if parent == Self.rootIno { throw notInRoot("creating files") }
        let (id, vfs, local) = try inVolume(parent)
        return mapped(id, try vfs.mknod(credentials, parent: local, name: name, mode: mode, rdev: rdev, umask: umask))
    }

    public func unlink(_ credentials: Credentials, parent: InodeID, name: [UInt8]) throws {
        if parent == Self.rootIno { throw notInRoot("unlink") }
        let (_, vfs, local) = try inVolume(parent)
        try vfs.unlink(credentials, parent: local, name: name)
    }

    public func rmdir(_ credentials: Credentials, parent: InodeID, name: [UInt8]) throws {
        if parent == Self.rootIno { throw notInRoot("rmdir") }
        let (_, vfs, local) = try inVolume(parent)
        try vfs.rmdir(credentials, parent: local, name: name)
    }

    public func symlink(_ credentials: Credentials, parent: InodeID, name: [UInt8], target: [UInt8]) throws -> Attributes {
        if parent == Self.rootIno { throw notInRoot("symlink") }
        let (id, vfs, local) = try inVolume(parent)
        return mapped(id, try vfs.symlink(credentials, parent: local, name: name, target: target))
    }

    public func readlink(_ credentials: Credentials, ino: InodeID) throws -> [UInt8] {
        if ino == Self.rootIno { throw WeftError(EINVAL) }
        let (_, vfs, local) = try inVolume(ino)
        return try vfs.readlink(credentials, ino: local)
    }

    public func link(_ credentials: Credentials, ino: InodeID, newParent: InodeID, newName: [UInt8]) throws -> Attributes {
        if newParent == Self.rootIno { throw notInRoot("link") }
        if ino == Self.rootIno { throw WeftError(EPERM) }
        guard Self.volumeID(ino) == Self.volumeID(newParent) else {
            throw WeftError(EXDEV, "a hard link cannot cross volumes")
        }
        let (id, vfs, local) = try inVolume(ino)
        return mapped(id, try vfs.link(credentials, ino: local, newParent: Self.local(newParent), newName: newName))
    }

    public func rename(_ credentials: Credentials, parent: InodeID, name: [UInt8], newParent: InodeID, newName: [UInt8],
                       flags: RenameFlags) throws {
        if parent == Self.rootIno || newParent == Self.rootIno { throw notInRoot("rename") }
        guard Self.volumeID(parent) == Self.volumeID(newParent) else {
            throw WeftError(EXDEV, "rename across volumes")
        }
        let (_, vfs, local) = try inVolume(parent)
        try vfs.rename(credentials, parent: local, name: name, newParent: Self.local(newParent), newName: newName, flags: flags)
    }

    public func access(_ credentials: Credentials, ino: InodeID, mask: UInt32) throws {
        if ino == Self.rootIno {
            // Mode 0755 root:root; writing is refused anyway.
            if mask & 2 != 0 && !credentials.isRoot { throw WeftError(EACCES) }
            return
        }
        let (_, vfs, local) = try inVolume(ino)
        try vfs.access(credentials, ino: local, mask: mask)
    }

    public func statfs(_ credentials: Credentials, ino: InodeID) throws -> FileSystemStats {
        if ino != Self.rootIno {
            let (_, vfs, local) = try inVolume(ino)
            return try vfs.statfs(credentials, ino: local)
        }
        if let first = lock.withLock({ opened.values.first }) { return try first.statfs(credentials) }
        return FileSystemStats(blockSizeBytes: 4096, totalBlocks: 0, freeBlocks: 0, totalInodes: 0, freeInodes: 0,
                               nameMaxBytes: UInt32(Limits.nameMaxBytes))
    }

    // MARK: Extended attributes

    public func getxattr(_ credentials: Credentials, ino: InodeID, name: [UInt8]) throws -> [UInt8] {
        if ino == Self.rootIno { throw WeftError(ENODATA) }
        let (_, vfs, local) = try inVolume(ino)
        return try vfs.getxattr(credentials, ino: local, name: name)
    }

    public func setxattr(_ credentials: Credentials, ino: InodeID, name: [UInt8], value: [UInt8], flags: XattrFlags) throws {
        if ino == Self.rootIno { throw notInRoot("setting extended attributes") }
        let (_, vfs, local) = try inVolume(ino)
        try vfs.setxattr(credentials, ino: local, name: name, value: value, flags: flags)
    }

    public func listxattr(_ credentials: Credentials, ino: InodeID) throws -> [[UInt8]] {
        if ino == Self.rootIno { return [] }
        let (_, vfs, local) = try inVolume(ino)
        return try vfs.listxattr(credentials, ino: local)
    }

    public func removexattr(_ credentials: Credentials, ino: InodeID, name: [UInt8]) throws {
        if ino == Self.rootIno { throw notInRoot("removing extended attributes") }
        let (_, vfs, local) = try inVolume(ino)
        try vfs.removexattr(credentials, ino: local, name: name)
    }

    // MARK: Directories

    public func opendir(_ credentials: Credentials, ino: InodeID) throws -> UInt64 {
        guard ino == Self.rootIno else {
            let (id, vfs, local) = try inVolume(ino)
            let handle = Self.global(id, try vfs.opendir(credentials, ino: local))
            if local == 1 { lock.withLock { _ = volumeRootHandles.insert(handle) } }
            return handle
        }
        var entries = [DirectoryEntry(name: [0x2E], ino: Self.rootIno, attributes: rootAttributes),
                       DirectoryEntry(name: [0x2E, 0x2E], ino: Self.rootIno, attributes: rootAttributes)]
        for volume in try volumes(fresh: true) {
            let ino = Self.global(volume.id, 1)
            var attributes = Attributes(ino: ino, mode: UInt32(S_IFDIR) | 0o755, nlink: 2, uid: 0, gid: 0,
                                        atimeNs: createdNs, mtimeNs: createdNs, ctimeNs: createdNs)
            do {
                attributes = mapped(volume.id, try open(volume).getattr(credentials, ino: 1))
            } catch {
                logger.warning("volume \(volume.name) does not answer; listed without its attributes: \(error)")
            }
            entries.append(DirectoryEntry(name: Array(volume.name.utf8), ino: ino, attributes: attributes))
        }
        return lock.withLock {
            let handle = nextRootHandle
            nextRootHandle += 1
            rootHandles[handle] = entries
            return handle
        }
    }

    public func readdir(handle id: UInt64, offset: Int, limit: Int) throws -> [DirectoryEntry] {
        let volume = Self.volumeID(id)
        guard volume != 0 else {
            guard let entries = lock.withLock({ rootHandles[id] }) else { throw WeftError(EBADF) }
            guard offset < entries.count else { return [] }
            return Array(entries[offset..<min(entries.count, offset + limit)])
        }
        let vfs = try vfs(volume)
        let isVolumeRoot = lock.withLock { volumeRootHandles.contains(id) }
        return try vfs.readdir(handle: Self.local(id), offset: offset, limit: limit).map { entry in
            var entry = entry
            if isVolumeRoot && entry.name == [0x2E, 0x2E] {
                entry.ino = Self.rootIno
                entry.attributes = rootAttributes
            } else {
                entry.ino = Self.global(volume, entry.ino)
                entry.attributes = mapped(volume, entry.attributes)
            }
            return entry
        }
    }

    public func releasedir(handle id: UInt64) {
        let volume = Self.volumeID(id)
        if volume == 0 {
            lock.withLock { _ = rootHandles.removeValue(forKey: id) }
        } else if let vfs = lock.withLock({ () -> VFS? in
            volumeRootHandles.remove(id)
            return opened[volume]
        }) {
            vfs.releasedir(handle: Self.local(id))
        }
    }

    public func syncDirectory(_ credentials: Credentials, ino: InodeID) throws {
        if ino == Self.rootIno { return }
        let (_, vfs, local) = try inVolume(ino)
        try vfs.syncDirectory(credentials, ino: local)
    }

    // MARK: Files

    public func open(_ credentials: Credentials, ino: InodeID, flags: Int32) throws -> (handle: UInt64, keepCache: Bool) {
        if ino == Self.rootIno { throw WeftError(EISDIR) }
        let (id, vfs, local) = try inVolume(ino)
        let (handle, keepCache) = try vfs.open(credentials, ino: local, flags: flags)
        return (Self.global(id, handle), keepCache)
    }

    public func create(_ credentials: Credentials, parent: InodeID, name: [UInt8], mode: UInt32, umask: UInt32,
                       flags: Int32) throws -> (attributes: Attributes, handle: UInt64) {
        if parent == Self.rootIno { throw notInRoot("creating files") }
        let (id, vfs, local) = try inVolume(parent)
        let (attributes, handle) = try vfs.create(credentials, parent: local, name: name, mode: mode, umask: umask, flags: flags)
        return (mapped(id, attributes), Self.global(id, handle))
    }

    private func fileVFS(_ handle: UInt64) throws -> (VFS, UInt64) {
        (try vfs(Self.volumeID(handle)), Self.local(handle))
    }

    public func read(handle id: UInt64, offset: UInt64, size: Int) throws -> ReadResult {
        let (vfs, local) = try fileVFS(id)
        return try vfs.read(handle: local, offset: offset, size: size)
    }

    public func write(handle id: UInt64, offset: UInt64, data: UnsafeRawBufferPointer) throws -> Int {
        let (vfs, local) = try fileVFS(id)
        return try vfs.write(handle: local, offset: offset, data: data)
    }

    public func write(handle id: UInt64, offset: UInt64, count: Int,
                      fill: (UnsafeMutableRawBufferPointer) throws -> Void) throws -> Int {
        let (vfs, local) = try fileVFS(id)
        return try vfs.write(handle: local, offset: offset, count: count, fill: fill)
    }

    public func flush(handle id: UInt64) throws {
        let (vfs, local) = try fileVFS(id)
        try vfs.flush(handle: local)
    }

    public func fsync(handle id: UInt64) throws {
        let (vfs, local) = try fileVFS(id)
        try vfs.fsync(handle: local)
    }

    public func release(handle id: UInt64) throws {
        let (vfs, local) = try fileVFS(id)
        try vfs.release(handle: local)
    }

    public func lock(_ credentials: Credentials, ino: InodeID, _ request: LockRequest) throws -> LockDescription {
        if ino == Self.rootIno { throw WeftError(EINVAL, "the global root cannot be locked") }
        let (_, vfs, local) = try inVolume(ino)
        return try vfs.lock(credentials, ino: local, request)
    }

    /// The volumes share one block cache; dropping it through any of them drops it for all.
    public func dropCachedData() -> Int {
        let any = lock.withLock { opened.values.first }
        return any?.dropCachedData() ?? 0
    }

    /// The volumes share one block cache and one write bound: any of them tells.
    public func cacheStatistics() -> AgentCacheStatistics? {
        let any = lock.withLock { opened.values.first }
        return any?.cacheStatistics()
    }

    public func shutdown() throws {
        let all = lock.withLock { Array(opened.values) }
        var firstError: Error?
        for vfs in all {
            do { try vfs.shutdown() } catch { firstError = firstError ?? error }
        }
        if let firstError { throw firstError }
    }
}

// MARK: Leases

extension GlobalNamespace {
    public func cacheToken() -> UInt64 { leaseCache.token() }

    /// The root listing is refreshed on each opendir; a volume's inodes follow its VFS's leases.
    public func mayCache(_ ino: InodeID, since token: UInt64) -> Bool {
        let id = Self.volumeID(ino)
        guard id != 0, let vfs = lock.withLock({ opened[id] }) else { return ino == Self.rootIno }
        return vfs.mayCache(ino, since: token)
    }
}
