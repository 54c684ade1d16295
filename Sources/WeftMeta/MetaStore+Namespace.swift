import WeftProto
#if canImport(Glibc)
import Glibc
#endif

extension MetaStore {
    public func lookup(_ credentials: Credentials, parent: InodeID, name: [UInt8]) throws -> Attributes {
        try read { t in
            let directory = try t.directory(parent)
            try Access.check(directory.attributes, credentials, Access.execute)
            if name == [0x2E] { return directory.attributes }
            if name == [0x2E, 0x2E] { return try t.inode(directory.parent).attributes }
            try validateName(name)
            guard let entry = try t.entry(parent, name) else { throw WeftError.notFound }
            return try t.inode(entry.ino).attributes
        }
    }

    public func getattr(_ ino: InodeID) throws -> Attributes {
        try read { t in try t.inode(ino).attributes }
    }

    public func setattr(_ credentials: Credentials, ino: InodeID, _ changes: SetAttributes) throws -> Attributes {
        try mutate { t in
            var record = try t.inode(ino)
            var attributes = record.attributes
            try changes.applyModeOwnerAndTimes(to: &attributes, credentials, now: t.now)
            if let size = changes.size {
                if attributes.isDirectory { throw WeftError.isDirectory }
                guard attributes.isRegular else { throw WeftError.invalid }
                if size > Limits.fileSizeMaxBytes { throw WeftError.fileTooBig }
                if !changes.byHandle { try Access.check(attributes, credentials, Access.write) }
                record.attributes = attributes
                try t.truncate(&record, to: size)
                attributes = record.attributes
            }
            attributes.ctimeNs = t.now
            record.attributes = attributes
            t.put(record)
            return attributes
        }
    }

    /// The ownership and mode of a new inode in `directory`, with the setgid-directory rules.
    private func newInodeOwnership(_ directory: Attributes, _ credentials: Credentials, mode: UInt32,
                                   isDirectory: Bool) -> (gid: UInt32, mode: UInt32) {
        var mode = mode
        var gid = credentials.gid
        if directory.mode & UInt32(S_ISGID) != 0 {
            gid = directory.gid
            if isDirectory { mode |= UInt32(S_ISGID) }
        }
        if !isDirectory && mode & UInt32(S_ISGID) != 0 && !credentials.isRoot && !credentials.isMember(of: gid) {
            mode &= ~UInt32(S_ISGID)
        }
        return (gid, mode)
    }

    /// Checks that `name` may be added to `parent`; returns the parent record.
    private func prepareInsert(_ t: Transaction, _ credentials: Credentials, parent: InodeID,
                               name: [UInt8]) throws -> InodeRecord {
        let directory = try t.directory(parent)
        try Access.check(directory.attributes, credentials, Access.execute)
        if isDotOrDotDot(name) { throw WeftError.exists }
        try validateName(name)
        if try t.entry(parent, name) != nil {
            throw WeftError.exists
        }
        try Access.check(directory.attributes, credentials, Access.write | Access.execute)
        if directory.attributes.nlink == 0 { throw WeftError.notFound }
        return directory
    }

    public func create(_ credentials: Credentials, parent: InodeID, name: [UInt8], mode: UInt32, rdev: UInt32,
                       umask: UInt32, exclusive: Bool) throws -> Attributes {
        try mutate { t in
            if !exclusive, !isDotOrDotDot(name), name.count <= Limits.nameMaxBytes,
               let existing = try? t.entry(parent, name) {
                let directory = try t.directory(parent)
                try Access.check(directory.attributes, credentials, Access.execute)
                let record = try t.inode(existing.ino)
                if record.attributes.isDirectory { throw WeftError.isDirectory }
                return record.attributes
            }
            return try insertNode(t, credentials, parent: parent, name: name, mode: mode, rdev: rdev, umask: umask).node
        }
    }

    /// `create` (`O_EXCL`) of a node that `session` opens in the same transaction, as `open`
    /// without `O_TRUNC` would count it (the creator may open its new file whatever its
    /// mode). Returns the file's attributes and its directory's after the change. The open is
    /// registered while the store's lock is held, so no change of another session can come
    /// between the create and the open; if the create fails, so does the open.
    public func createOpen(_ credentials: Credentials, session: SessionID, parent: InodeID, name: [UInt8],
                           mode: UInt32, umask: UInt32) throws -> (file: Attributes, parent: Attributes) {
        var opened: InodeID?
        do {
            return try mutate { t in
                let (file, directory) = try insertNode(t, credentials, parent: parent, name: name, mode: mode, rdev: 0,
                                                       umask: umask)
                if file.isRegular {
                    openCounts[file.ino, default: 0] += 1
                    sessions[session]?.opens[file.ino, default: 0] += 1
                    opened = file.ino
                }
                return (file, directory)
            }
        } catch {
            // Not applied, or not durable: the caller is told it failed and will not release it.
            if let ino = opened {
                lock.withLock {
                    openCounts[ino] = openCounts[ino].flatMap { $0 > 1 ? $0 - 1 : nil }
                    if let count = sessions[session]?.opens[ino] { sessions[session]?.opens[ino] = count > 1 ? count - 1 : nil }
                }
            }
            throw error
        }
    }

    /// Inserts a new non-directory inode named `name` in `parent`: the node's attributes and the
    /// directory's after the change.
    private func insertNode(_ t: Transaction, _ credentials: Credentials, parent: InodeID, name: [UInt8], mode: UInt32,
                            rdev: UInt32, umask: UInt32) throws -> (node: Attributes, directory: Attributes) {
        var directory = try prepareInsert(t, credentials, parent: parent, name: name)
        var type = mode & UInt32(S_IFMT)
        if type == 0 { type = UInt32(S_IFREG) }
        guard [S_IFREG, S_IFIFO, S_IFSOCK, S_IFCHR, S_IFBLK].map({ UInt32($0) }).contains(type) else {
            throw WeftError.invalid
        }
        if (type == UInt32(S_IFCHR) || type == UInt32(S_IFBLK)) && !credentials.isRoot { throw WeftError.notPermitted }
        let ownership = newInodeOwnership(directory.attributes, credentials, mode: mode & 0o7777 & ~umask,
                                          isDirectory: false)
        let ino = try t.allocateInode()
        let attributes = Attributes(ino: ino, mode: type | ownership.mode, nlink: 1, uid: credentials.uid,
                                    gid: ownership.gid, rdev: rdev, atimeNs: t.now, mtimeNs: t.now, ctimeNs: t.now)
        t.put(InodeRecord(attributes: attributes, parent: 0))
        t.putEntry(parent, name, EntryValue(ino: ino, type: type))
        t.touchDirectory(&directory)
        t.put(directory)
        return (attributes, directory.attributes)
    }

    public func mkdir(_ credentials: Credentials, parent: InodeID, name: [UInt8], mode: UInt32,
                      umask: UInt32) throws -> Attributes {
        try mutate { t in
            var directory = try prepareInsert(t, credentials, parent: parent, name: name)
            if directory.attributes.nlink >= Limits.linkCountMax { throw WeftError.tooManyLinks }
            let ownership = newInodeOwnership(directory.attributes, credentials, mode: mode & 0o7777 & ~umask,
                                              isDirectory: true)
            let ino = try t.allocateInode()
            let attributes = Attributes(ino: ino, mode: UInt32(S_IFDIR) | ownership.mode, nlink: 2, uid: credentials.uid,
                                        gid: ownership.gid, atimeNs: t.now, mtimeNs: t.now, ctimeNs: t.now)
            t.put(InodeRecord(attributes: attributes, parent: parent))
            t.putEntry(parent, name, EntryValue(ino: ino, type: UInt32(S_IFDIR)))
            directory.attributes.nlink += 1
            t.touchDirectory(&directory)
            t.put(directory)
            return attributes
        }
    }

    public func symlink(_ credentials: Credentials, parent: InodeID, name: [UInt8], target: [UInt8]) throws -> Attributes {
        try mutate { t in
            if target.isEmpty { throw WeftError(ENOENT, "empty symlink target") }
            if target.count > Limits.symlinkMaxBytes { throw WeftError.nameTooLong }
            var directory = try prepareInsert(t, credentials, parent: parent, name: name)
            let ownership = newInodeOwnership(directory.attributes, credentials, mode: 0o777, isDirectory: false)
            let ino = try t.allocateInode()
            let attributes = Attributes(ino: ino, mode: UInt32(S_IFLNK) | 0o777, nlink: 1, uid: credentials.uid,
                                        gid: ownership.gid, size: UInt64(target.count), atimeNs: t.now,
                                        mtimeNs: t.now, ctimeNs: t.now)
            t.put(InodeRecord(attributes: attributes, parent: 0))
            t.batch.put(Key.symlink(ino), target)
            t.putEntry(parent, name, EntryValue(ino: ino, type: UInt32(S_IFLNK)))
            t.touchDirectory(&directory)
            t.put(directory)
            return attributes
        }
    }

    public func readlink(_ ino: InodeID) throws -> [UInt8] {
        try read { t in
            guard try t.inode(ino).attributes.isSymlink else { throw WeftError.invalid }
            guard let target = try db.get(Key.symlink(ino)) else { throw WeftError(EIO, "symlink \(ino) has no target") }
            return target
        }
    }

    public func link(_ credentials: Credentials, ino: InodeID, newParent: InodeID, newName: [UInt8]) throws -> Attributes {
        try mutate { t in
            var record = try t.inode(ino)
            if record.attributes.isDirectory { throw WeftError.notPermitted }
            if record.attributes.nlink == 0 { throw WeftError.notFound }
            var directory = try prepareInsert(t, credentials, parent: newParent, name: newName)
            if record.attributes.nlink >= Limits.linkCountMax { throw WeftError.tooManyLinks }
            record.attributes.nlink += 1
            record.attributes.ctimeNs = t.now
            t.put(record)
            t.putEntry(newParent, newName, EntryValue(ino: ino, type: record.attributes.fileType))
            t.touchDirectory(&directory)
            t.put(directory)
            return record.attributes
        }
    }

    /// Looks up `name` in `parent` for removal; checks write+search permission and the sticky bit.
    private func prepareRemoval(_ t: Transaction, _ credentials: Credentials, parent: InodeID,
                                name: [UInt8]) throws -> (InodeRecord, InodeRecord) {
        let directory = try t.directory(parent)
        try Access.check(directory.attributes, credentials, Access.execute)
        try validateName(name)
        guard let entry = try t.entry(parent, name) else { throw WeftError.notFound }
        let victim = try t.inode(entry.ino)
        try Access.check(directory.attributes, credentials, Access.write | Access.execute)
        try Access.checkSticky(directory: directory.attributes, victim: victim.attributes, credentials)
        return (directory, victim)
    }

    /// `expecting`: what the name must hold when the change applies, else `EntryChanged`.
    public func unlink(_ credentials: Credentials, parent: InodeID, name: [UInt8],
                       expecting: EntryExpectation = .any) throws {
        try mutate { t in
            if isDotOrDotDot(name) { throw WeftError.isDirectory }
            var (directory, victim) = try prepareRemoval(t, credentials, parent: parent, name: name)
            try expecting.check(t, parent, name)
            if victim.attributes.isDirectory { throw WeftError.isDirectory }
            t.deleteEntry(parent, name)
            try t.dropLink(&victim)
            t.touchDirectory(&directory)
            t.put(directory)
        }
    }

    /// `expecting`: what the name must hold when the change applies, else `EntryChanged`.
    public func rmdir(_ credentials: Credentials, parent: InodeID, name: [UInt8],
                      expecting: EntryExpectation = .any) throws {
        try mutate { t in
            if name == [0x2E] { throw WeftError.invalid }
            if name == [0x2E, 0x2E] { throw WeftError.notEmpty }
            var (directory, victim) = try prepareRemoval(t, credentials, parent: parent, name: name)
            try expecting.check(t, parent, name)
            if !victim.attributes.isDirectory { throw WeftError.notDirectory }
            if victim.attributes.ino == InodeNumbers.root { throw WeftError.busy }
            if try !t.isEmptyDirectory(victim.attributes.ino) { throw WeftError.notEmpty }
            t.deleteEntry(parent, name)
            try t.reclaim(victim)
            directory.attributes.nlink -= 1
            t.touchDirectory(&directory)
            t.put(directory)
        }
    }

    public func readdir(_ credentials: Credentials, ino: InodeID, after: [UInt8]?, limit: Int) throws -> [DirectoryEntry] {
        try read { t in
            let directory = try t.directory(ino)
            guard limit > 0 else { throw WeftError(EINVAL, "readdir limit must be positive") }
            let limit = min(limit, Limits.readdirPageMaxEntries)
            var entries: [DirectoryEntry] = []
            var start: [UInt8]? = nil
            // "." and ".." come first; `after` may name either of them to resume there.
            if after == nil {
                entries.append(DirectoryEntry(name: [0x2E], ino: ino, attributes: directory.attributes))
            }
            if (after == nil || after == [0x2E]) && entries.count < limit {
                entries.append(DirectoryEntry(name: [0x2E, 0x2E], ino: directory.parent,
                                              attributes: try t.inode(directory.parent).attributes))
            }
            if let after, !isDotOrDotDot(after) {
                start = Key.entry(ino, after)
            }
            // A page shorter than `limit` is the end of the directory (the agent relies on it to
            // list a small directory in one read, SPEC.md §7): an entry whose inode is missing
            // is skipped without taking a place in the page.
            let prefix = Key.entryPrefix(ino)
            if entries.count < limit {
                try db.scan(prefix: prefix, from: start) { key, value in
                    let name = Array(key[prefix.count...])
                    if let after, name == after { return true }
                    let entry = try EntryValue.decode(value)
                    guard let child = try t.inodeIfPresent(entry.ino) else { return true }
                    entries.append(DirectoryEntry(name: name, ino: entry.ino, attributes: child.attributes))
                    return entries.count < limit
                }
            }
            return entries
        }
    }

    public func access(_ credentials: Credentials, ino: InodeID, mask: UInt32) throws {
        try read { t in try Access.check(try t.inode(ino).attributes, credentials, mask & 7) }
    }

    /// Checks open permission, applies O_TRUNC and registers the open with `session`.
    public func open(_ credentials: Credentials, session: SessionID, ino: InodeID, flags: Int32) throws -> Attributes {
        var opened = false
        do {
            return try openCounted(credentials, session: session, ino: ino, flags: flags, opened: &opened)
        } catch {
            // An O_TRUNC whose change failed (ENOSPC on a full metadata disk): not open.
            if opened {
                lock.withLock {
                    openCounts[ino] = openCounts[ino].flatMap { $0 > 1 ? $0 - 1 : nil }
                    if let count = sessions[session]?.opens[ino] { sessions[session]?.opens[ino] = count > 1 ? count - 1 : nil }
                }
            }
            throw error
        }
    }

    private func openCounted(_ credentials: Credentials, session: SessionID, ino: InodeID, flags: Int32,
                             opened: inout Bool) throws -> Attributes {
        try mutate { t in
            var record = try t.inode(ino)
            let accessMode = flags & O_ACCMODE
            var mask: UInt32 = 0
            if accessMode == O_RDONLY || accessMode == O_RDWR { mask |= Access.read }
            if accessMode == O_WRONLY || accessMode == O_RDWR { mask |= Access.write }
            if flags & O_TRUNC != 0 { mask |= Access.write }
            if record.attributes.isDirectory && mask & Access.write != 0 { throw WeftError.isDirectory }
            if record.attributes.isSymlink { throw WeftError(ELOOP) }
            try Access.check(record.attributes, credentials, mask)
            if flags & O_TRUNC != 0 && record.attributes.isRegular && record.attributes.size > 0 {
                try t.truncate(&record, to: 0)
                record.attributes.ctimeNs = t.now
                t.put(record)
            }
            if record.attributes.isRegular {
                openCounts[ino, default: 0] += 1
                sessions[session]?.opens[ino, default: 0] += 1
                opened = true
            }
            return record.attributes
        }
    }

    public func release(session: SessionID, ino: InodeID) throws {
        try release(session: session, inos: [ino])
    }

    /// Ends one open of each of `inos` by `session` (an inode named twice, two), in one
    /// transaction; an inode the session has not open is skipped.
    public func release(session: SessionID, inos: [InodeID]) throws {
        try mutate(durable: false) { t in
            for ino in inos {
                guard let count = sessions[session]?.opens[ino], count > 0 else { continue }
                sessions[session]?.opens[ino] = count > 1 ? count - 1 : nil
                try t.dropOpen(ino, count: 1)
            }
        }
    }

    public func statfs(totalBytes: UInt64, freeBytes: UInt64) throws -> FileSystemStats {
        let blockSize: UInt64 = 4096
        let inodes = currentCounters.inodes
        let freeInodes: UInt64 = 1 << 40
        return FileSystemStats(blockSizeBytes: UInt32(blockSize), totalBlocks: totalBytes / blockSize,
                               freeBlocks: freeBytes / blockSize, totalInodes: inodes + freeInodes,
                               freeInodes: freeInodes, nameMaxBytes: UInt32(Limits.nameMaxBytes))
    }
}

/// What a change expects a name to hold when it applies: the home recalls the leases on the
/// inodes it looked up under the names before the change, and another change of the same names
/// may have replaced them since (SPEC.md §12.6, "A racing rename").
public enum EntryExpectation: Sendable, Equatable {
    case any
    case absent
    case inode(InodeID)

    public init(_ ino: InodeID?) { self = ino.map { .inode($0) } ?? .absent }

    func check(_ t: Transaction, _ parent: InodeID, _ name: [UInt8]) throws {
        let found: InodeID?
        switch self {
        case .any: return
        case .absent, .inode:
            guard (try? t.directory(parent)) != nil else { return }   // the change fails on its own
            found = try t.entry(parent, name)?.ino
        }
        if self != EntryExpectation(found) { throw EntryChanged(parent: parent, name: name) }
    }
}

/// A name no longer holds what a change expected (`EntryExpectation`): the caller recalls again
/// and retries.
public struct EntryChanged: Error, Sendable {
    public let parent: InodeID
    public let name: [UInt8]
}
