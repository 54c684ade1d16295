import Foundation
import WeftProto

/// Bounds the bytes of buffered writes. A writer over the bound first frees space by committing
/// buffered data (backpressure), so memory never exceeds the bound.
final class DirtyBudget: @unchecked Sendable {
    private let condition = NSCondition()
    private var usedBytes = 0
    let limitBytes: Int

    init(limitBytes: Int) {
        self.limitBytes = limitBytes
    }

    func reserve(_ bytes: Int, makeRoom: () throws -> Void) throws {
        var attempts = 0
        while true {
            condition.lock()
            if usedBytes + bytes <= limitBytes || usedBytes == 0 {
                usedBytes += bytes
                condition.unlock()
                return
            }
            condition.unlock()
            attempts += 1
            if attempts > 1000 { throw WeftError(ENOBUFS, "write buffer stays full") }
            try makeRoom()
        }
    }

    func release(_ bytes: Int) {
        condition.lock()
        usedBytes -= bytes
        precondition(usedBytes >= 0, "write buffer accounting went negative")
        condition.broadcast()
        condition.unlock()
    }

    var used: Int {
        condition.lock()
        defer { condition.unlock() }
        return usedBytes
    }
}
