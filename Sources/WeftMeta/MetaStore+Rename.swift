import WeftProto
#if canImport(Glibc)
import Glibc
#endif

extension MetaStore {
    /// Atomic rename with RENAME_NOREPLACE and RENAME_EXCHANGE, following rename(2) and renameat2(2).
    /// `expecting`: what the two names must hold when the change applies, else `EntryChanged`.
    public func rename(_ credentials: Credentials, parent: InodeID, name: [UInt8], newParent: InodeID,
                       newName: [UInt8], flags: RenameFlags,
                       expecting: (source: EntryExpectation, target: EntryExpectation) = (.any, .any)) throws {
        try mutate { t in
            if flags.contains(.noReplace) && flags.contains(.exchange) { throw WeftError.invalid }
            if !flags.subtracting([.noReplace, .exchange]).isEmpty { throw WeftError.invalid }
            var sourceDirectory = try t.directory(parent)
            var targetDirectory = parent == newParent ? sourceDirectory : try t.directory(newParent)
            try Access.check(sourceDirectory.attributes, credentials, Access.execute)
            try Access.check(targetDirectory.attributes, credentials, Access.execute)
            if isDotOrDotDot(name) || isDotOrDotDot(newName) { throw WeftError.busy }
            try validateName(name)
            try validateName(newName)
            guard let sourceEntry = try t.entry(parent, name) else { throw WeftError.notFound }
            var source = try t.inode(sourceEntry.ino)
            let targetEntry = try t.entry(newParent, newName)
            try Access.check(sourceDirectory.attributes, credentials, Access.write | Access.execute)
            try Access.check(targetDirectory.attributes, credentials, Access.write | Access.execute)
            try Access.checkSticky(directory: sourceDirectory.attributes, victim: source.attributes, credentials)
            // Allowed, and the source exists: the change would apply to what the names hold now.
            try expecting.source.check(t, parent, name)
            try expecting.target.check(t, newParent, newName)

            if parent == newParent && name == newName { return }
            if let targetEntry, targetEntry.ino == sourceEntry.ino {
                // Two links of one inode: rename(2) does nothing; RENAME_EXCHANGE swaps equal names.
                if flags.contains(.noReplace) { throw WeftError.exists }
                return
            }
            if flags.contains(.noReplace) && targetEntry != nil { throw WeftError.exists }
            if flags.contains(.exchange) && targetEntry == nil { throw WeftError.notFound }
            var target = try targetEntry.map { try t.inode($0.ino) }
            if let target {
                try Access.checkSticky(directory: targetDirectory.attributes, victim: target.attributes, credentials)
            }
            let movesBetweenDirectories = parent != newParent
            if source.attributes.isDirectory && movesBetweenDirectories {
                try Access.check(source.attributes, credentials, Access.write)
                try refuseLoop(t, moving: source.attributes.ino, into: newParent)
            }

            if flags.contains(.exchange), var other = target {
                if other.attributes.isDirectory && movesBetweenDirectories {
                    try Access.check(other.attributes, credentials, Access.write)
                    try refuseLoop(t, moving: other.attributes.ino, into: parent)
                }
                t.putEntry(parent, name, EntryValue(ino: other.attributes.ino, type: other.attributes.fileType))
                t.putEntry(newParent, newName, EntryValue(ino: source.attributes.ino, type: source.attributes.fileType))
                if movesBetweenDirectories {
                    if source.attributes.isDirectory {
                        source.parent = newParent
                        sourceDirectory.attributes.nlink -= 1
                        targetDirectory.attributes.nlink += 1
                    }
                    if other.attributes.isDirectory {
                        other.parent = parent
                        targetDirectory.attributes.nlink -= 1
                        sourceDirectory.attributes.nlink += 1
                    }
                }
                other.attributes.ctimeNs = t.now
                t.put(other)
            } else {
                if var victim = target {
                    if source.attributes.isDirectory {
                        guard victim.attributes.isDirectory else { throw WeftError.notDirectory }
                        if try !t.isEmptyDirectory(victim.attributes.ino) { throw WeftError.notEmpty }
                        try t.reclaim(victim)
                        targetDirectory.attributes.nlink -= 1
                    } else {
                        if victim.attributes.isDirectory { throw WeftError.isDirectory }
                        try t.dropLink(&victim)
                    }
                    target = nil
                }
                t.deleteEntry(parent, name)
                t.putEntry(newParent, newName, EntryValue(ino: source.attributes.ino, type: source.attributes.fileType))
                if source.attributes.isDirectory && movesBetweenDirectories {
                    source.parent = newParent
                    sourceDirectory.attributes.nlink -= 1
                    targetDirectory.attributes.nlink += 1
                }
            }
            source.attributes.ctimeNs = t.now
            t.put(source)
            if movesBetweenDirectories {
                t.touchDirectory(&sourceDirectory)
                t.touchDirectory(&targetDirectory)
                t.put(sourceDirectory)
                t.put(targetDirectory)
            } else {
                // One directory: only `targetDirectory` was changed (a replaced empty directory).
                t.touchDirectory(&targetDirectory)
                t.put(targetDirectory)
            }
        }
    }

    /// EINVAL if `directory` is `into` or one of its ancestors (a directory cannot move under itself).
    private func refuseLoop(_ t: Transaction, moving directory: InodeID, into: InodeID) throws {
        var current = into
        var steps = 0
        while true {
            if current == directory { throw WeftError(EINVAL, "cannot move a directory into itself") }
            if current == InodeNumbers.root { return }
            current = try t.inode(current).parent
            steps += 1
            precondition(steps < 1_000_000, "directory parent chain has a cycle")
        }
    }
}
